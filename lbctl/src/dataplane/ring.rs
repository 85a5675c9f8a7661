//! `lb_ring_v2`, the services' Maglev tables, created BPF_F_MMAPABLE: a table is written by
//! mapping just its pages into the writer's memory and copying it there, instead of the kernel
//! copying and checking it element by element (BPF_MAP_UPDATE_BATCH took 2.5 times as long for a
//! whole apply). Only the pages of one table are mapped at a time, so the agent's RSS does not
//! grow by the kernel's tables. A resize copies the tables the same way, a bounded window at a
//! time.
use super::{spec, sys};
use crate::error::{Error, Result};
use aya::maps::MapData;
use lb_common::{self as common, RING_LANES};
use std::path::Path;

const CHUNK: usize = std::mem::size_of::<common::RingChunk>();
/// A resize copies (and a comparison reads) 64 MiB at a time: the mappings, and this process's
/// RSS, stay small.
const STEP: usize = 64 << 20;

/// The table map opened for writing.
pub(super) struct RingMap {
    map: MapData,
    elements: usize,
}

impl RingMap {
    /// Opens `lb_ring_v2` pinned in `dir`, refusing one of another value layout.
    pub(super) fn open(dir: &Path) -> Result<RingMap> {
        let map = spec::open_data(dir, common::MAP_RING)?;
        let info = map
            .info()
            .map_err(|e| Error::map("reading lb_ring_v2's description", e))?;
        if info.value_size() as usize != CHUNK {
            return Err(Error::Layout {
                dir: dir.to_path_buf(),
                maps: format!(
                    "{} with {}-byte values",
                    common::MAP_RING,
                    info.value_size()
                ),
            });
        }
        Ok(RingMap {
            map,
            elements: info.max_entries() as usize,
        })
    }

    /// Writes a table of backend ids (`slots`, one per slot) into the elements from `first`; the
    /// lanes of the last element past the table are zeroed. The caller publishes the table with
    /// a map update (the service's flip), a system call, which comes after these stores.
    pub(super) fn write(&mut self, first: u32, slots: &[u32]) -> Result<()> {
        let first = first as usize;
        let count = slots.len().div_ceil(RING_LANES as usize);
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.elements)
        {
            return Err(Error::io(
                "writing a Maglev table",
                std::io::Error::other(format!(
                    "elements {first}..{} are outside lb_ring_v2 ({} elements)",
                    first + count,
                    self.elements
                )),
            ));
        }
        let mut window = sys::map_write(&self.map, first * CHUNK, count * CHUNK)?;
        let (table, tail) = window.split_at_mut(slots.len() * 4);
        for (dst, id) in table.chunks_exact_mut(4).zip(slots) {
            dst.copy_from_slice(&id.to_ne_bytes());
        }
        tail.fill(0);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// `spec::MapSpec::copy` for the tables: the first `elements` elements of `src` (the services
/// both sizes hold) into the table map pinned in `to`, through memory mappings of both maps.
pub(super) fn copy_tables(src: MapData, to: &Path, _: &str, elements: u32) -> Result<usize> {
    let dst = spec::open_data(to, common::MAP_RING)?;
    let total = elements as usize * CHUNK;
    let mut at = 0;
    while at < total {
        let len = STEP.min(total - at);
        let r = sys::map_read(&src, at, len)?;
        let mut w = sys::map_write(&dst, at, len)?;
        w.copy_from_slice(&r);
        at += len;
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(elements as usize)
}

/// `spec::MapSpec::contents` for the tables: the elements below `elements` that hold a slot.
pub(super) fn contents(map: MapData, name: &str, elements: u32) -> Result<spec::Contents> {
    let elements = elements.min(spec::max_entries(&map, name)?) as usize;
    let mut out = spec::Contents::default();
    let per_step = STEP / CHUNK;
    let mut at = 0;
    while at < elements {
        let n = per_step.min(elements - at);
        let window = sys::map_read(&map, at * CHUNK, n * CHUNK)?;
        for (i, chunk) in window.chunks_exact(CHUNK).enumerate() {
            out.add_slot((at + i) as u32, chunk);
        }
        at += n;
    }
    Ok(out)
}
