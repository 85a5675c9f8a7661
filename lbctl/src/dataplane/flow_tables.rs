//! The flow tables (`lb_ct_v2`, `lb_ct6_v2`) as user space reads and writes them: the layout and
//! the rules of `lb_common::flow_table`, a bucket per read or write; their seed
//! (`lb_ctseed_v1`); and the flows of an older agent's tables (`lb_ct_v1`, `lb_ct6_v1`, LRU
//! hashes) carried into them (`upgrade` decides when).
use super::spec::{open_data, open_map, typed};
use crate::error::{Error, Result};
use aya::{
    Pod,
    maps::{Array, HashMap, MapData, MapError},
};
use lb_common::{
    self as common, FlowEntry,
    flow_table::{FlowBucket, FlowKey, bucket_of, fill, slot_for},
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

/// A pinned flow table with its seed.
pub struct FlowTable<K>
where
    FlowBucket<K>: Pod,
{
    map: Array<MapData, FlowBucket<K>>,
    seed: u64,
    name: String,
}

impl<K: FlowKey> FlowTable<K>
where
    FlowBucket<K>: Pod,
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
            name: name.to_string(),
        })
    }

    fn bucket(&self, b: u32) -> Result<FlowBucket<K>> {
        self.map
            .get(&b, 0)
            .map_err(|e| Error::map(format!("reading {}", self.name), e))
    }

    /// Every live flow: (key, entry). A bucket the program changes while it is read may show a
    /// flow it just evicted or miss one it just wrote, as a walk of a hash map would.
    pub fn entries(&self) -> impl Iterator<Item = (K, FlowEntry)> + '_ {
        (0..self.map.len())
            .filter_map(|b| self.bucket(b).ok())
            .flat_map(move |bucket| {
                let seed = self.seed;
                bucket.slots.into_iter().filter_map(move |s| s.get(seed))
            })
    }

    fn place(&self, key: &K) -> (u64, u32) {
        let mix = key.mix(self.seed);
        (mix, bucket_of(mix, self.map.len()))
    }

    /// The entry of `key`'s flow.
    pub fn get(&self, key: &K) -> Result<Option<FlowEntry>> {
        let (mix, b) = self.place(key);
        let bucket = self.bucket(b)?;
        Ok(bucket
            .slots
            .iter()
            .find(|s| s.holds(key, mix))
            .map(|s| s.entry))
    }

    /// Writes `entry` for `key` unless the table holds the key already (the program wrote it
    /// since); true if written. As the program does, it takes an empty slot or the slot noted
    /// longest ago. The bucket is read and written whole: a flow the program writes into the
    /// same bucket in between is lost (and decided again at its next packet).
    pub fn insert_absent(&mut self, key: &K, entry: &FlowEntry, now_ns: u64) -> Result<bool> {
        let (mix, b) = self.place(key);
        let mut bucket = self.bucket(b)?;
        if bucket.slots.iter().any(|s| s.holds(key, mix)) {
            return Ok(false);
        }
        let i = slot_for(&bucket, key, mix, now_ns);
        fill(&mut bucket.slots[i], key, mix, entry);
        self.map
            .set(b, bucket, 0)
            .map_err(|e| Error::map(format!("writing {}", self.name), e))?;
        Ok(true)
    }

    /// Empties `key`'s slot; true if the table held it.
    pub fn remove(&mut self, key: &K) -> Result<bool> {
        let (mix, b) = self.place(key);
        let mut bucket = self.bucket(b)?;
        let Some(s) = bucket.slots.iter_mut().find(|s| s.holds(key, mix)) else {
            return Ok(false);
        };
        s.check = 0;
        self.map
            .set(b, bucket, 0)
            .map_err(|e| Error::map(format!("writing {}", self.name), e))?;
        Ok(true)
    }
}

/// Copies every live flow of `src` into the table `name` pinned in `to` (which has the same
/// seed: a resize pins the same seed map in both); flows the destination holds already stay.
/// Returns how many were written.
pub(super) fn copy<K: FlowKey>(src: MapData, to: &Path, name: &str) -> Result<usize>
where
    FlowBucket<K>: Pod,
{
    let mut dst = FlowTable::<K>::open(to, name)?;
    let src = FlowTable::<K>::from_data(src, name, dst.seed)?;
    let mut n = 0;
    for (k, e) in src.entries() {
        n += dst.insert_absent(&k, &e, 0)? as usize;
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
    FlowBucket<K>: Pod,
{
    let seed = pinned_seed(dir)?.unwrap_or(0);
    let table = FlowTable::<K>::from_data(map, name, seed)?;
    let mut out = super::spec::Contents::default();
    for (k, e) in table.entries() {
        out.add(super::sys::bytes_of(&k), super::sys::bytes_of(&e));
    }
    Ok(out)
}

/// Carries the flows of the older flow table `old` (an LRU hash) pinned in `dir` into the table
/// `new`. A flow the new programs made in the meantime (its next packet found no entry and was
/// decided again, through the same Maglev table) keeps its own entry. Returns how many flows
/// were carried.
pub(super) fn carry<K: FlowKey + Pod>(dir: &Path, old: &str, new: &str) -> Result<usize>
where
    FlowBucket<K>: Pod,
{
    let src: HashMap<MapData, K, FlowEntry> = open_map(dir, old)?;
    let mut dst = FlowTable::<K>::open(dir, new)?;
    let mut n = 0;
    for item in src.iter() {
        match item {
            Ok((k, e)) => n += dst.insert_absent(&k, &e, 0)? as usize,
            // Evicted while walked.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(format!("reading {old}"), e)),
        }
    }
    Ok(n)
}
