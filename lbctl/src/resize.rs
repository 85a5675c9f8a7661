//! Moving a pinned data plane to other sizes (`--max-services`, `--max-backends`, `--max-members`,
//! `--flow-table-size`) without losing a service or a tracked flow. The Maglev tables' size and
//! seed must stay: they decide where every untracked flow goes.
//!
//! 1. The new maps are created, with a new program, in a directory beside the pins.
//! 2. Everything the old maps hold is copied into them at the same ids (services, backends,
//!    memberships, tables, counters, flows).
//! 3. The new maps' pins replace the old ones (rename on bpffs), so readers and the next writer
//!    see the new maps.
//! 4. `attach` moves the pinned links to the new program (`bpf_link_update`): from then on no
//!    packet touches the old maps.
//! 5. The flows the old program created between 2 and 4 are copied again (`OldFlows`).
use crate::{
    dataplane::{self, Maps, TableConfig, Window, open_map},
    error::{Error, Result},
};
use aya::{
    Pod,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use lb_common::{
    self as common, Backend, Backend6, Flow, Flow6, FlowEntry, FragEntry, FragKey, Member,
    MemberKey, ReplyEntry, ReplyEntry6, Service, Traffic, VipKey, VipKey6,
};
use std::path::{Path, PathBuf};

/// Where the new maps are made before they take the old ones' places.
pub(crate) const STAGING: &str = "resizing";

/// The pinned data plane's sizes, when it must be moved to `table`'s; an error when it cannot be.
pub(crate) fn needed(dir: &Path, table: &TableConfig) -> Result<Option<TableConfig>> {
    let Ok(pinned) = dataplane::pinned_table(dir) else {
        return Ok(None);
    };
    if pinned == *table {
        return Ok(None);
    }
    if pinned.size != table.size || pinned.seed != table.seed {
        return Err(Error::Table {
            dir: dir.to_path_buf(),
            pinned: pinned.to_string(),
            asked: table.to_string(),
        });
    }
    Ok(Some(pinned))
}

/// The old data plane's flow tables, kept open until the links run the new program.
pub(crate) struct OldFlows {
    v4: HashMap<MapData, Flow, FlowEntry>,
    replies: HashMap<MapData, Flow, ReplyEntry>,
    v6: HashMap<MapData, Flow6, FlowEntry>,
    replies6: HashMap<MapData, Flow6, ReplyEntry6>,
    fragments: HashMap<MapData, FragKey, FragEntry>,
}

impl OldFlows {
    /// Copies the flows again, once no packet reaches the old maps any more.
    pub(crate) fn copy_into(self, dir: &Path) -> Result<usize> {
        Ok(copy_entries(&self.v4, dir, common::MAP_FLOWS)?
            + copy_entries(&self.replies, dir, common::MAP_REPLIES)?
            + copy_entries(&self.v6, dir, common::MAP_FLOWS6)?
            + copy_entries(&self.replies6, dir, common::MAP_REPLIES6)?
            + copy_entries(&self.fragments, dir, common::MAP_FRAGMENTS)?)
    }
}

/// Steps 1 to 3: returns the new program (loaded, not attached) and the old flow tables.
pub(crate) fn prepare(
    dir: &Path,
    old: &TableConfig,
    new: &TableConfig,
) -> Result<(aya::Ebpf, OldFlows)> {
    fits(dir, new)?;
    let staging = dir.join(STAGING);
    let _ = dataplane::down(&staging);
    let ebpf = dataplane::load_with(&staging, new)?;
    let copied = copy_all(dir, &staging, old, new).and_then(|()| {
        Ok(OldFlows {
            v4: open_map(dir, common::MAP_FLOWS)?,
            replies: open_map(dir, common::MAP_REPLIES)?,
            v6: open_map(dir, common::MAP_FLOWS6)?,
            replies6: open_map(dir, common::MAP_REPLIES6)?,
            fragments: open_map(dir, common::MAP_FRAGMENTS)?,
        })
    });
    let old_flows = match copied {
        Ok(f) => f,
        Err(e) => {
            // Nothing was replaced yet: the old data plane goes on as it was.
            let _ = dataplane::down(&staging);
            return Err(e);
        }
    };
    for name in common::ALL_MAPS {
        let (from, to) = (staging.join(name), dir.join(name));
        std::fs::rename(&from, &to).map_err(|e| {
            Error::io(
                format!("replacing {} with {}", to.display(), from.display()),
                e,
            )
        })?;
    }
    let _ = std::fs::remove_dir(&staging);
    tracing::info!(from = %old, to = %new, "data plane resized; tracked flows kept");
    Ok((ebpf, old_flows))
}

/// Refuses sizes that cannot hold what the data plane holds now.
fn fits(dir: &Path, new: &TableConfig) -> Result<()> {
    let state = Maps::open(dir)?.read()?;
    let used = state.usage();
    let mut short = Vec::new();
    if let Some(id) = state.services.values().map(|s| s.id).max()
        && id >= new.services
    {
        short.push(format!(
            "service id {id} is in use (--max-services {} or more)",
            id + 1
        ));
    }
    if let Some(id) = state.backend_ids.values().copied().max()
        && id >= new.backends
    {
        short.push(format!(
            "backend id {id} is in use (--max-backends {} or more)",
            id + 1
        ));
    }
    if used.members > new.members {
        short.push(format!(
            "{} memberships are in use (--max-members {} or more)",
            used.members, used.members
        ));
    }
    if short.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "the data plane at {} cannot be made smaller than what it holds: {}",
            dir.display(),
            short.join("; ")
        )))
    }
}

/// Step 2: every map but the configuration (which `load_with` wrote).
fn copy_all(from: &Path, to: &Path, old: &TableConfig, new: &TableConfig) -> Result<()> {
    let services = old.services.min(new.services);
    let backends = old.backends.min(new.backends);
    copy_hash::<VipKey, Service>(from, to, common::MAP_SERVICES)?;
    copy_hash::<VipKey6, Service>(from, to, common::MAP_SERVICES6)?;
    copy_hash::<MemberKey, Member>(from, to, common::MAP_MEMBERS)?;
    copy_array::<Backend>(from, to, common::MAP_BACKENDS, backends)?;
    copy_array::<Backend6>(from, to, common::MAP_BACKENDS6, backends)?;
    copy_per_cpu::<Traffic>(from, to, common::MAP_SERVICE_TRAFFIC, services)?;
    copy_per_cpu::<Traffic>(from, to, common::MAP_BACKEND_TRAFFIC, backends)?;
    copy_per_cpu::<u64>(from, to, common::MAP_STATS, common::STAT_COUNT)?;
    copy_per_cpu::<u64>(from, to, common::MAP_FLOWS_LOST, 1)?;
    copy_ring(from, to, common::ring_entries(services, old.size) as usize)?;
    copy_hash::<Flow, FlowEntry>(from, to, common::MAP_FLOWS)?;
    copy_hash::<Flow, ReplyEntry>(from, to, common::MAP_REPLIES)?;
    copy_hash::<Flow6, FlowEntry>(from, to, common::MAP_FLOWS6)?;
    copy_hash::<Flow6, ReplyEntry6>(from, to, common::MAP_REPLIES6)?;
    copy_hash::<FragKey, FragEntry>(from, to, common::MAP_FRAGMENTS)?;
    Ok(())
}

fn copy_hash<K: Pod, V: Pod>(from: &Path, to: &Path, name: &str) -> Result<usize> {
    let src: HashMap<MapData, K, V> = open_map(from, name)?;
    copy_entries(&src, to, name)
}

/// Inserts every entry of `src` into map `name` pinned in `to`. Entries that leave `src` while it
/// is walked (LRU evictions) are skipped, as the program would have lost them too.
fn copy_entries<K: Pod, V: Pod>(
    src: &HashMap<MapData, K, V>,
    to: &Path,
    name: &str,
) -> Result<usize> {
    let mut dst: HashMap<MapData, K, V> = open_map(to, name)?;
    let mut n = 0;
    for (k, v) in src.iter().flatten() {
        dst.insert(k, v, 0)
            .map_err(|e| Error::map(format!("copying {name}"), e))?;
        n += 1;
    }
    Ok(n)
}

/// `copy_array` and `copy_per_cpu`: the first `count` slots of an array map of type `$map`.
macro_rules! copy_slots {
    ($name:ident, $map:ident) => {
        fn $name<V: Pod>(from: &Path, to: &Path, name: &str, count: u32) -> Result<()> {
            let src: $map<MapData, V> = open_map(from, name)?;
            let mut dst: $map<MapData, V> = open_map(to, name)?;
            for i in 0..count {
                let v = src
                    .get(&i, 0)
                    .map_err(|e| Error::map(format!("reading {name}"), e))?;
                dst.set(i, v, 0)
                    .map_err(|e| Error::map(format!("copying {name}"), e))?;
            }
            Ok(())
        }
    };
}
copy_slots!(copy_array, Array);
copy_slots!(copy_per_cpu, PerCpuArray);

/// The tables, `elements` elements from the start (the services both sizes have), copied page
/// by page through memory mappings of both maps.
fn copy_ring(from: &Path, to: &Path, elements: usize) -> Result<()> {
    let open = |dir: &Path| -> Result<MapData> {
        let path: PathBuf = dir.join(common::MAP_RING);
        MapData::from_pin(&path).map_err(|e| Error::map(format!("opening {}", path.display()), e))
    };
    let (src, dst) = (open(from)?, open(to)?);
    let page = dataplane::page_size();
    let total = elements * std::mem::size_of::<common::RingChunk>();
    // 64 MiB at a time keeps the mappings (and this process's RSS) small.
    let step = 64 << 20;
    let mut at = 0;
    while at < total {
        let len = step.min(total - at);
        let r = Window::map(&src, at, len, page, false)?;
        let w = Window::map(&dst, at, len, page, true)?;
        // SAFETY: both windows hold `len` bytes from `at` of two different maps.
        unsafe { std::ptr::copy_nonoverlapping(r.ptr, w.ptr, len) };
        at += len;
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}
