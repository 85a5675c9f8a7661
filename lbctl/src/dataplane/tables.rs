//! `lb_tables_v2`, the services' Maglev tables: an array of maps whose elements are chunks, each
//! an array map of `TABLES_PER_CHUNK` tables of one size class (`common::TABLE_FLAGS`). A
//! service's entry names the class and the block of its live table (`Service::table`,
//! `common::table_ref`). A service gets the smallest class with 100 slots per active backend
//! (`common::table_class`), at most the configured size: the tables of small services, most of
//! them, take a few KiB instead of 64, and take that much less time to build and to write. A
//! new table is written into a free block of its class, then the service's entry switches to it
//! (one update, with its active count), so a packet sees the old table or the new one, never a
//! mix; the old block is free from then on.
//!
//! Chunks are made when the services need more blocks (all that an apply needs with one system
//! call: the kernel waits for a grace period of RCU after each update of an array of maps, about
//! 8 ms here) and removed when none of their blocks is used, so kernel memory follows the
//! services that have backends, not the room for services. A table is filled through a memory
//! mapping of its pages (BPF_MAP_UPDATE_BATCH took 2.5 times as long for a whole apply). A
//! resize puts the same chunks into the new outer map: nothing is copied.
use super::{spec, sys};
use crate::error::{Error, Result};
use aya::maps::{ArrayOfMaps, MapData, MapError};
use lb_common::{self as common, NO_TABLE, TABLES_PER_CHUNK};
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

const CHUNK: usize = std::mem::size_of::<common::RingChunk>();
/// `BPF_MAP_TYPE_ARRAY`.
const ARRAY: u32 = 2;
/// What `bpftool map` shows for each chunk.
const CHUNK_NAME: &str = "lb_tables";
/// Chunks `trim` removes at most at a time: each removal waits for an RCU grace period (about
/// 8 ms here; arrays of maps have no batch deletion), so a mass departure frees its chunks over
/// the next applies instead of holding one up.
const TRIM_AT_ONCE: usize = 4;
/// Free blocks kept beyond what the writes need. Blocks are reused oldest-freed first, so a
/// block a service just left is written again only after this many other writes: a packet
/// that read the service's former entry has long finished with it (a program runs for
/// microseconds; a write takes tens of them).
const SPARE: usize = TABLES_PER_CHUNK as usize;

/// Free blocks of one size class.
#[derive(Default)]
struct Free {
    blocks: BTreeSet<u32>,
    /// The same blocks, oldest freed first: the order writes take them in.
    queue: VecDeque<u32>,
}

impl Free {
    fn give(&mut self, block: u32) {
        if self.blocks.insert(block) {
            self.queue.push_back(block);
        }
    }
}

/// The outer map, opened for writing and reading tables. Each chunk holds tables of one size
/// class (`common::table_class`): a service's table is written into a block of its class.
pub(super) struct Tables {
    outer: ArrayOfMaps<MapData, MapData>,
    /// The same map, for what aya's `ArrayOfMaps` does not offer (batches, removal).
    outer_data: MapData,
    /// The configured table size (class 0).
    size: u32,
    /// The chunks the outer map holds, with their class.
    chunks: BTreeMap<u32, u32>,
    /// Chunks whose size is no class's at this configured size (none that this agent or the
    /// one before made): never written, never removed.
    foreign: BTreeSet<u32>,
    /// Per class, the blocks of its chunks no service uses (known once `adopt` was told the
    /// used ones).
    free: BTreeMap<u32, Free>,
    /// The chunk the last write went into, still mapped into this process: a bulk apply fills
    /// one chunk after the other, with one lookup and one mapping a chunk instead of a table.
    /// Unmapped by `trim` (at the end of every apply) or when a write goes to another chunk.
    mapped: Option<(u32, memmap2::MmapMut)>,
}

impl Tables {
    /// Opens `lb_tables_v2` pinned in `dir`, for tables of `ring_size` slots at most (class 0),
    /// to read tables; `adopt` before writing.
    pub(super) fn open(dir: &Path, ring_size: u32) -> Result<Tables> {
        Ok(Tables {
            outer: spec::open_map(dir, common::MAP_TABLES)?,
            outer_data: spec::open_data(dir, common::MAP_TABLES)?,
            size: ring_size,
            chunks: BTreeMap::new(),
            foreign: BTreeSet::new(),
            free: BTreeMap::new(),
            mapped: None,
        })
    }

    /// Elements of one table of `class`.
    fn stride(&self, class: u32) -> u32 {
        common::ring_stride(common::table_size(class, self.size))
    }

    /// The class whose chunks have `elements` elements: class 0 (the configured size) first,
    /// then the classes smaller than it, which `common::table_class` gives.
    fn class_of_chunk(&self, elements: u32) -> Option<u32> {
        (0..=common::SIZE_CLASSES)
            .filter(|k| *k == 0 || common::class_size(*k) < self.size)
            .find(|k| TABLES_PER_CHUNK * self.stride(*k) == elements)
    }

    /// Finds the chunks the outer map holds and their classes (by their size), and takes the
    /// blocks the services' entries name (`used`, as `Service::table`) as used, every other
    /// block of those chunks as free.
    pub(super) fn adopt(&mut self, used: impl IntoIterator<Item = u32>) -> Result<()> {
        let used: BTreeSet<u32> = used
            .into_iter()
            .filter(|t| *t != NO_TABLE)
            .map(common::ref_block)
            .collect();
        (self.chunks, self.foreign, self.free) =
            (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
        for c in self.present()? {
            let elements = spec::max_entries(&self.chunk(c)?, CHUNK_NAME)?;
            let Some(class) = self.class_of_chunk(elements) else {
                tracing::warn!(
                    chunk = c,
                    elements,
                    "a chunk of Maglev tables of no size this agent uses: left alone"
                );
                self.foreign.insert(c);
                continue;
            };
            self.chunks.insert(c, class);
            let free = self.free.entry(class).or_default();
            for b in blocks(c).filter(|b| !used.contains(b)) {
                free.give(b);
            }
        }
        Ok(())
    }

    /// Free blocks of `class`.
    fn free_of(&self, class: u32) -> usize {
        self.free.get(&class).map_or(0, |f| f.blocks.len())
    }

    /// Makes sure at least `n` blocks of each class (`wanted`: class -> n), and `SPARE` more,
    /// are free: the chunks missing are made and put in the outer map with one system call.
    /// When chunks must be made, they leave a chunk more than that free (what `trim` keeps):
    /// else an apply that ends with exactly `SPARE` blocks free (10,000 services of one class
    /// do) makes the next change of one service make a chunk, which took 20 ms at 10,000
    /// services (the outer map's update waits for an RCU grace period).
    /// The blocks needed come before the spare; when the outer map has no room for them,
    /// chunks of other classes that no service uses are removed first. `Error::Full` when it
    /// has no room for any block needed (with room for some, those are made).
    pub(super) fn reserve(&mut self, wanted: &BTreeMap<u32, usize>) -> Result<()> {
        let per = TABLES_PER_CHUNK as usize;
        let (mut need, mut spare) = (Vec::new(), Vec::new());
        for (class, n) in wanted {
            let have = self.free_of(*class);
            let needed = n.saturating_sub(have).div_ceil(per);
            let with_spare = if have >= n + SPARE {
                0
            } else {
                (n + SPARE + per).saturating_sub(have).div_ceil(per)
            };
            need.extend(std::iter::repeat_n(*class, needed));
            spare.extend(std::iter::repeat_n(*class, with_spare - needed));
        }
        if need.is_empty() && spare.is_empty() {
            return Ok(());
        }
        if self.open_slots().count() < need.len() {
            self.remove_empty(false, wanted, usize::MAX)?;
        }
        let needed = !need.is_empty();
        let plan: Vec<(u32, u32)> = self
            .open_slots()
            .zip(need.into_iter().chain(spare))
            .collect();
        if plan.is_empty() {
            if !needed {
                return Ok(());
            }
            return Err(Error::Full(format!(
                "all {} blocks of Maglev tables are in use (raise --max-services)",
                self.outer.len() * TABLES_PER_CHUNK
            )));
        }
        let keys: Vec<u32> = plan.iter().map(|(c, _)| *c).collect();
        let class_at: BTreeMap<u32, u32> = plan.iter().copied().collect();
        let elements =
            |c: u32| TABLES_PER_CHUNK * self.stride(class_at.get(&c).copied().unwrap_or(0));
        put_chunks(&self.outer_data, &keys, |c| new_chunk(elements(c)))
            .map_err(|e| Error::io("putting Maglev table chunks in lb_tables_v2", e))?;
        for (c, class) in plan {
            self.chunks.insert(c, class);
            let free = self.free.entry(class).or_default();
            blocks(c).for_each(|b| free.give(b));
        }
        Ok(())
    }

    /// Indexes of the outer map that hold no chunk.
    fn open_slots(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.outer.len()).filter(|c| !self.chunks.contains_key(c) && !self.foreign.contains(c))
    }

    /// Writes a table of `class` (`slots`, one backend id per slot, as many as the class has;
    /// the lanes past them are zero) into the free block of that class freed longest ago (of
    /// those `accept`ed), and returns what the service's entry names it by
    /// (`common::table_ref`). The block stays taken until `free`.
    pub(super) fn write(
        &mut self,
        class: u32,
        slots: &[u32],
        accept: impl Fn(u32) -> bool,
    ) -> Result<u32> {
        let stride = self.stride(class);
        let size = common::table_size(class, self.size);
        if class > common::SIZE_CLASSES || slots.len() != size as usize {
            return Err(Error::io(
                "writing a Maglev table",
                std::io::Error::other(format!(
                    "{} slots are not a table of class {class} ({size} slots)",
                    slots.len(),
                )),
            ));
        }
        let accepted = |t: &Tables| {
            t.free
                .get(&class)
                .and_then(|f| f.queue.iter().position(|b| accept(*b)))
        };
        if accepted(self).is_none() {
            // (An apply reserves what it writes, with the spare, beforehand.)
            self.reserve(&BTreeMap::from([(class, 1)]))?;
        }
        let Some(at) = accepted(self) else {
            return Err(Error::Full(
                "no free block of Maglev tables (raise --max-services)".into(),
            ));
        };
        let Some(free) = self.free.get_mut(&class) else {
            return Err(Error::Full("no free block of Maglev tables".into()));
        };
        let block = free.queue[at];
        let c = block / TABLES_PER_CHUNK;
        let len = stride as usize * CHUNK;
        if self.mapped.as_ref().is_none_or(|(at, _)| *at != c) {
            self.mapped = None;
            let chunk = self.chunk(c)?;
            let whole = sys::map_write(&chunk, 0, TABLES_PER_CHUNK as usize * len)?;
            self.mapped = Some((c, whole));
        }
        let Some((_, whole)) = self.mapped.as_mut() else {
            return Err(Error::io(
                "writing a Maglev table",
                std::io::Error::other("the chunk is not mapped"),
            ));
        };
        let start = (block % TABLES_PER_CHUNK) as usize * len;
        let window = &mut whole[start..start + len];
        let (table, tail) = window.split_at_mut(slots.len() * 4);
        for (dst, id) in table.chunks_exact_mut(4).zip(slots) {
            dst.copy_from_slice(&id.to_ne_bytes());
        }
        tail.fill(0);
        // The service entry's update, a system call, comes after these stores.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if let Some(free) = self.free.get_mut(&class) {
            free.blocks.remove(&block);
            free.queue.remove(at);
        }
        Ok(common::table_ref(class, block))
    }

    /// Gives a table back (`Service::table`): no service's entry names it any more.
    pub(super) fn free(&mut self, table: u32) {
        if table == NO_TABLE {
            return;
        }
        let (class, block) = (common::ref_class(table), common::ref_block(table));
        if self.chunks.get(&(block / TABLES_PER_CHUNK)) == Some(&class) {
            self.free.entry(class).or_default().give(block);
        }
    }

    /// Removes chunks none of whose blocks is used, as long as `SPARE` blocks and a chunk more
    /// of their class stay free while some service uses the class (so that an apply of one
    /// change, which reserves one block and the spare, does not make a chunk that the next trim
    /// removes: each costs an RCU grace period), at most `TRIM_AT_ONCE`. Returns how many.
    pub(super) fn trim(&mut self) -> Result<usize> {
        self.remove_empty(true, &BTreeMap::new(), TRIM_AT_ONCE)
    }

    /// Removes at most `at_most` chunks none of whose blocks is used, of the classes not in
    /// `except`; with `keep_spare`, only as long as `SPARE` blocks and a chunk more of their
    /// class stay free, for a class some service uses. Returns how many.
    fn remove_empty(
        &mut self,
        keep_spare: bool,
        except: &BTreeMap<u32, usize>,
        at_most: usize,
    ) -> Result<usize> {
        self.mapped = None;
        let per = TABLES_PER_CHUNK as usize;
        let mut empty: Vec<u32> = Vec::new();
        for (class, free) in self.free.iter().filter(|(k, _)| !except.contains_key(k)) {
            let mut of_class: Vec<u32> = self
                .chunks
                .iter()
                .filter(|(c, k)| *k == class && blocks(**c).all(|b| free.blocks.contains(&b)))
                .map(|(c, _)| *c)
                .collect();
            // A class no service uses keeps no spare.
            let in_use =
                self.chunks.values().filter(|k| *k == class).count() * per > free.blocks.len();
            while keep_spare
                && in_use
                && !of_class.is_empty()
                && free.blocks.len() - of_class.len() * per < SPARE + per
            {
                of_class.pop();
            }
            empty.extend(of_class);
        }
        // The highest first (their indexes are the last a growing data plane reuses).
        empty.sort_unstable_by(|a, b| b.cmp(a));
        empty.truncate(at_most);
        let mut removed = 0;
        for c in empty {
            match sys::map_delete(&self.outer_data, c) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.forget_free_of_removed();
                    return Err(Error::io(
                        format!("removing unused chunk {c} of Maglev tables from lb_tables_v2"),
                        e,
                    ));
                }
            }
            if let Some(class) = self.chunks.remove(&c)
                && let Some(free) = self.free.get_mut(&class)
            {
                for b in blocks(c) {
                    free.blocks.remove(&b);
                }
            }
            removed += 1;
        }
        self.forget_free_of_removed();
        Ok(removed)
    }

    /// Drops from the order of free blocks those that are no longer free (their chunk went).
    fn forget_free_of_removed(&mut self) {
        for free in self.free.values_mut() {
            let blocks = &free.blocks;
            free.queue.retain(|b| blocks.contains(b));
        }
    }

    /// The chunks the outer map holds, as `adopt` found them (and the writes since).
    pub(super) fn chunks(&self) -> usize {
        self.chunks.len() + self.foreign.len()
    }

    /// The chunks the outer map holds now.
    pub(super) fn present(&self) -> Result<BTreeSet<u32>> {
        let mut out = BTreeSet::new();
        for c in 0..self.outer.len() {
            match self.outer.get(&c, 0) {
                Ok(_) => {
                    out.insert(c);
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map("reading lb_tables_v2", e)),
            }
        }
        Ok(out)
    }

    /// The chunks the outer map holds now, and the bytes of kernel memory their tables take.
    pub(super) fn memory(&self) -> Result<(usize, u64)> {
        let present = self.present()?;
        let mut bytes = 0u64;
        for c in &present {
            bytes += u64::from(spec::max_entries(&self.chunk(*c)?, CHUNK_NAME)?) * CHUNK as u64;
        }
        Ok((present.len(), bytes))
    }

    /// The slots of the table `Service::table` names (None: its chunk is not there), as many
    /// as its class has.
    pub(super) fn read(&self, table: u32) -> Result<Option<Vec<u32>>> {
        let (class, block) = (common::ref_class(table), common::ref_block(table));
        let size = common::table_size(class, self.size);
        if size == 0 {
            return Ok(None);
        }
        let chunk = match self.outer.get(&(block / TABLES_PER_CHUNK), 0) {
            Ok(c) => c,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(Error::map("reading lb_tables_v2", e)),
        };
        let len = self.stride(class) as usize * CHUNK;
        let start = (block % TABLES_PER_CHUNK) as usize * len;
        if start + len > spec::max_entries(&chunk, CHUNK_NAME)? as usize * CHUNK {
            return Ok(None);
        }
        let window = sys::map_read(&chunk, start, len)?;
        Ok(Some(
            window
                .chunks_exact(4)
                .take(size as usize)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }

    fn chunk(&self, c: u32) -> Result<MapData> {
        self.outer
            .get(&c, 0)
            .map_err(|e| Error::map(format!("opening chunk {c} of lb_tables_v2"), e))
    }
}

/// The blocks of chunk `c`.
fn blocks(c: u32) -> std::ops::Range<u32> {
    c * TABLES_PER_CHUNK..(c + 1) * TABLES_PER_CHUNK
}

/// `spec::MapSpec::copy` for the tables: the chunks at indexes below `n` of `src` put at the
/// same indexes of the outer map pinned in `to` (the same chunks: the kernel keeps each while an
/// outer map holds it). Refused when a chunk is beyond the new map. Returns how many.
pub(super) fn copy_tables(src: MapData, to: &Path, name: &str, n: u32) -> Result<usize> {
    let src: ArrayOfMaps<MapData, MapData> = spec::typed(src, name)?;
    let dst = spec::open_data(to, name)?;
    let mut keys = Vec::new();
    for c in 0..src.len() {
        match src.get(&c, 0) {
            Ok(_) if c >= n => {
                return Err(Error::io(
                    format!("copying {name}"),
                    std::io::Error::other(format!(
                        "chunk {c} of Maglev tables is in use and beyond the new size ({n})"
                    )),
                ));
            }
            // (Opened again by `put_chunks`, a group at a time.)
            Ok(_) => keys.push(c),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(format!("reading {name}"), e)),
        }
    }
    put_chunks(&dst, &keys, |c| {
        src.get(&c, 0)
            .map_err(|e| Error::map(format!("reading {name}"), e))
    })
    .map_err(|e| Error::io(format!("copying {name}"), e))?;
    Ok(keys.len())
}

/// Chunks put in an outer map with one system call per group: the kernel waits for an RCU
/// grace period after each call, and a group bounds the descriptors open at once (a process
/// may have as few as 1,024; 100,000 services take 6,251 chunks).
const CHUNKS_AT_ONCE: usize = 256;

/// Puts `chunk(k)` at each index `k` of `keys` in `outer`, `CHUNKS_AT_ONCE` at a time. The
/// chunks of a group are made on as many threads as the machine has CPUs: the kernel zeroes
/// each new chunk (1 MiB at the default size) in the call that makes it.
fn put_chunks(
    outer: &MapData,
    keys: &[u32],
    chunk: impl Fn(u32) -> Result<MapData> + Sync,
) -> std::io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for group in keys.chunks(CHUNKS_AT_ONCE) {
        let per = group.len().div_ceil(threads).max(1);
        let made: Vec<Result<Vec<MapData>>> = std::thread::scope(|s| {
            let workers: Vec<_> = group
                .chunks(per)
                .map(|part| s.spawn(|| part.iter().map(|k| chunk(*k)).collect()))
                .collect();
            workers
                .into_iter()
                // Making a map does not panic; were it to, so does this.
                .map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut maps = Vec::with_capacity(group.len());
        for part in made {
            maps.extend(part.map_err(std::io::Error::other)?);
        }
        let fds: Vec<u32> = maps
            .iter()
            .map(|m| m.fd().as_fd().as_raw_fd() as u32)
            .collect();
        sys::map_update_batch(outer, group, &fds).map_err(|(done, e)| {
            std::io::Error::new(
                e.kind(),
                format!("{e} ({done} of {} chunks set)", group.len()),
            )
        })?;
    }
    Ok(())
}

/// A new, zeroed chunk of `elements` table elements.
fn new_chunk(elements: u32) -> Result<MapData> {
    let def = aya_obj::Map::new_from_params(ARRAY, 4, CHUNK as u32, elements, common::TABLE_FLAGS);
    MapData::create(def, CHUNK_NAME, None)
        .map_err(|e| Error::map("creating a chunk of Maglev tables", e))
}

/// `spec::MapSpec::contents` for the tables: one entry per chunk below `n`, with what it holds.
pub(super) fn contents(map: MapData, _: &Path, name: &str, n: u32) -> Result<spec::Contents> {
    let outer: ArrayOfMaps<MapData, MapData> = spec::typed(map, name)?;
    let mut out = spec::Contents::default();
    for c in 0..n.min(outer.len()) {
        let chunk = match outer.get(&c, 0) {
            Ok(chunk) => chunk,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(Error::map(format!("reading {name}"), e)),
        };
        let len = spec::max_entries(&chunk, CHUNK_NAME)? as usize * CHUNK;
        let window = sys::map_read(&chunk, 0, len)?;
        out.add(&c.to_ne_bytes(), &window);
    }
    Ok(out)
}
