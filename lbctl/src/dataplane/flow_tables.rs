//! The flow tables (`lb_ct_v3`, `lb_ct6_v5`) as user space reads and writes them: the layout and
//! the rules of `lb_common::flow_table`, a bucket per read or write; their seed
//! (`lb_ctseed_v1`); and the flows of an older agent's tables (`lb_ct_v1`, `lb_ct6_v1`, LRU
//! hashes; `lb_ct6_v2`, buckets of another hash) carried into them (`upgrade` decides when).
use super::spec::{open_data, open_map, typed};
use crate::error::{Error, Result};
use aya::{
    Pod,
    maps::{Array, HashMap, MapData, MapError},
};
use lb_common::{
    self as common, FlowEntry,
    flow_table::{Buckets, FlowBucket, FlowKey, buckets_of, insert},
};
use std::path::Path;

/// The seed of the flow tables pinned in `dir` (`lb_ctseed_v1`); None when that map is not
/// pinned or holds 0 (not written yet).
pub(crate) fn pinned_seed(dir: &Path) -> Result<Option<u64>> {
    if !dir.join(common::MAP_FLOW_SEED).exists() {
        return Ok(None);
    }
    let map: Array<MapData, u64> = open_map(dir, common::MAP_FLOW_SEED)?;
    let seed = map
        .get(&0, 0)
        .map_err(|e| Error::map(format!("reading {}", common::MAP_FLOW_SEED), e))?;
    Ok((seed != 0).then_some(seed))
}

/// Writes `seed` into `lb_ctseed_v1` pinned in `dir`.
pub(crate) fn write_seed(dir: &Path, seed: u64) -> Result<()> {
    let mut map: Array<MapData, u64> = open_map(dir, common::MAP_FLOW_SEED)?;
    map.set(0, seed, 0)
        .map_err(|e| Error::map(format!("writing {}", common::MAP_FLOW_SEED), e))
}

/// Pins the seed map pinned in `dir` in `to` too (a resize's staging directory), creating `to`.
pub(super) fn pin_seed(dir: &Path, to: &Path) -> Result<()> {
    if !dir.join(common::MAP_FLOW_SEED).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(to).map_err(|e| Error::io(format!("creating {}", to.display()), e))?;
    open_data(dir, common::MAP_FLOW_SEED)?
        .pin(to.join(common::MAP_FLOW_SEED))
        .map_err(|e| {
            Error::io(
                format!("pinning {} in {}", common::MAP_FLOW_SEED, to.display()),
                std::io::Error::other(e.to_string()),
            )
        })
}

/// A new seed: 8 random bytes from the kernel, never 0.
pub(crate) fn new_seed() -> Result<u64> {
    use std::io::Read as _;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading /dev/urandom for the flow tables' seed", e))?;
    Ok(u64::from_ne_bytes(b).max(1))
}

/// Buckets a walk of a flow table reads with one system call (512 KiB of IPv4 buckets).
const WALK_BUCKETS: u32 = 4096;

/// A pinned flow table with its seed, and the hash keys made from it.
pub struct FlowTable<K: FlowKey>
where
    FlowBucket<K>: Pod + Default,
{
    map: Array<MapData, FlowBucket<K>>,
    seed: u64,
    keys: K::Keys,
    name: String,
}

impl<K: FlowKey> FlowTable<K>
where
    FlowBucket<K>: Pod + Default,
{
    /// Opens the table `name` pinned in `dir`, with the seed pinned beside it.
    pub fn open(dir: &Path, name: &str) -> Result<FlowTable<K>> {
        let seed = pinned_seed(dir)?.ok_or_else(|| {
            Error::io(
                format!("reading the flow tables' seed in {}", dir.display()),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} is not pinned or not written", common::MAP_FLOW_SEED),
                ),
            )
        })?;
        Self::from_data(open_data(dir, name)?, name, seed)
    }

    pub(super) fn from_data(data: MapData, name: &str, seed: u64) -> Result<Self> {
        Ok(FlowTable {
            map: typed(data, name)?,
            seed,
            keys: K::keys(seed),
            name: name.to_string(),
        })
    }

    fn bucket(&self, b: u32) -> Result<FlowBucket<K>> {
        self.map
            .get(&b, 0)
            .map_err(|e| Error::map(format!("reading {}", self.name), e))
    }

    /// Every live flow: (key, entry), read a batch of buckets at a time. A bucket the program
    /// changes while it is read may show a flow it just evicted or miss one it just wrote, as a
    /// walk of a hash map would.
    pub fn entries(&self) -> Result<Vec<(K, FlowEntry)>> {
        let data = aya::maps::IterableMap::<u32, FlowBucket<K>>::map(&self.map);
        let mut out = Vec::new();
        super::sys::array_walk_batch(
            data,
            self.map.len(),
            WALK_BUCKETS,
            |_, b: &FlowBucket<K>| out.extend(b.slots.iter().filter_map(|s| s.get(&self.keys))),
        )
        .map_err(|e| Error::io(format!("reading {}", self.name), e))?;
        Ok(out)
    }

    fn place(&self, key: &K) -> (u64, [u32; 2]) {
        let mix = key.mix(&self.keys);
        let (first, second) = buckets_of(mix, self.map.len());
        (mix, [first, second])
    }

    fn write(&mut self, b: u32, bucket: FlowBucket<K>) -> Result<()> {
        self.map
            .set(b, bucket, 0)
            .map_err(|e| Error::map(format!("writing {}", self.name), e))
    }

    /// The entry of `key`'s flow.
    pub fn get(&self, key: &K) -> Result<Option<FlowEntry>> {
        let (mix, at) = self.place(key);
        for b in at {
            let bucket = self.bucket(b)?;
            if let Some(s) = bucket.slots.iter().find(|s| s.holds(key, mix)) {
                return Ok(Some(s.entry));
            }
        }
        Ok(None)
    }

    /// Writes `entry` for `key` unless the table holds the key already (the program wrote it
    /// since); true if written. It goes where the program would put it (`flow_table::insert`,
    /// which may first move a flow of its buckets to that flow's other bucket). The buckets
    /// are read and written whole: a flow the program writes into the same bucket in between
    /// is lost (and decided again at its next packet).
    pub fn insert_absent(&mut self, key: &K, entry: &FlowEntry) -> Result<bool> {
        let (mix, [first, second]) = self.place(key);
        let (mut a, mut b) = (self.bucket(first)?, self.bucket(second)?);
        if a.slots.iter().chain(&b.slots).any(|s| s.holds(key, mix)) {
            return Ok(false);
        }
        let mut rest = Rest {
            table: self,
            error: None,
        };
        let written = insert(
            (&mut a, &mut b),
            [first, second],
            &mut rest,
            key,
            mix,
            entry,
        );
        if let Some(e) = rest.error {
            return Err(e);
        }
        match written {
            0 => self.write(first, a)?,
            _ => self.write(second, b)?,
        }
        Ok(true)
    }

    /// Empties `key`'s slot; true if the table held it.
    pub fn remove(&mut self, key: &K) -> Result<bool> {
        let (mix, at) = self.place(key);
        let mut found = false;
        for b in at {
            let mut bucket = self.bucket(b)?;
            let mut here = false;
            for s in bucket.slots.iter_mut().filter(|s| s.holds(key, mix)) {
                s.check = 0;
                here = true;
            }
            if here {
                self.write(b, bucket)?;
                found = true;
            }
        }
        Ok(found)
    }
}

/// A table's buckets for `make_room` to move a flow into: read, changed and written back whole
/// (only when changed); the first error is kept, and the buckets after it are not touched.
struct Rest<'a, K: FlowKey>
where
    FlowBucket<K>: Pod + Default,
{
    table: &'a mut FlowTable<K>,
    error: Option<Error>,
}

impl<K: FlowKey> Buckets<K> for Rest<'_, K>
where
    FlowBucket<K>: Pod + Default,
{
    fn keys(&self) -> K::Keys {
        self.table.keys
    }
    fn count(&self) -> u32 {
        self.table.map.len()
    }
    fn with<R>(&mut self, b: u32, f: impl FnOnce(&mut FlowBucket<K>) -> R) -> Option<R> {
        if self.error.is_some() {
            return None;
        }
        let done = self.table.bucket(b).and_then(|before| {
            let mut after = before;
            let r = f(&mut after);
            if after != before {
                self.table.write(b, after)?;
            }
            Ok(r)
        });
        done.map_err(|e| self.error = Some(e)).ok()
    }
}

/// Copies every live flow of `src` into the table `name` pinned in `to` (which has the same
/// seed: a resize pins the same seed map in both); flows the destination holds already stay.
/// Returns how many were written.
pub(super) fn copy<K: FlowKey>(src: MapData, to: &Path, name: &str) -> Result<usize>
where
    FlowBucket<K>: Pod + Default,
{
    let mut dst = FlowTable::<K>::open(to, name)?;
    let src = FlowTable::<K>::from_data(src, name, dst.seed)?;
    let mut n = 0;
    for (k, e) in src.entries()? {
        n += dst.insert_absent(&k, &e)? as usize;
    }
    Ok(n)
}

/// What a flow table holds (for `spec::MapSpec::contents`): its live flows.
pub(super) fn contents<K: FlowKey + Pod>(
    map: MapData,
    dir: &Path,
    name: &str,
) -> Result<super::spec::Contents>
where
    FlowBucket<K>: Pod + Default,
{
    let seed = pinned_seed(dir)?.unwrap_or(0);
    let table = FlowTable::<K>::from_data(map, name, seed)?;
    let mut out = super::spec::Contents::default();
    for (k, e) in table.entries()? {
        out.add(super::sys::bytes_of(&k), super::sys::bytes_of(&e));
    }
    Ok(out)
}

/// Carries the flows of the older flow table `old` (an LRU hash of `K`) pinned in `dir` into the
/// table `new`. A flow the new programs made in the meantime (its next packet found no entry and was
/// decided again, through the same Maglev table) keeps its own entry. Returns how many flows
/// were carried.
pub(super) fn carry<K: FlowKey + Pod>(dir: &Path, old: &str, new: &str) -> Result<usize>
where
    FlowBucket<K>: Pod + Default,
{
    let src: HashMap<MapData, K, FlowEntry> = open_map(dir, old)?;
    let mut dst = FlowTable::<K>::open(dir, new)?;
    let mut n = 0;
    for item in src.iter() {
        match item {
            Ok((k, e)) => n += dst.insert_absent(&k, &e)? as usize,
            // Evicted while walked.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(format!("reading {old}"), e)),
        }
    }
    Ok(n)
}

/// Carries the flows of the older table of buckets `old` pinned in `dir`, whose keys hash as `O`
/// (the same layout as `K`, another hash), into the table `new`, as `carry` does.
pub(super) fn carry_buckets<O: FlowKey, K: FlowKey>(
    dir: &Path,
    old: &str,
    new: &str,
    into: impl Fn(O) -> K,
) -> Result<usize>
where
    FlowBucket<O>: Pod + Default,
    FlowBucket<K>: Pod + Default,
{
    let mut dst = FlowTable::<K>::open(dir, new)?;
    let src = FlowTable::<O>::from_data(open_data(dir, old)?, old, dst.seed)?;
    let mut n = 0;
    for (k, e) in src.entries()? {
        n += dst.insert_absent(&into(k), &e)? as usize;
    }
    Ok(n)
}
