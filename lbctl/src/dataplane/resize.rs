//! Moving a pinned data plane to other sizes (`--max-services`, `--max-backends`, `--max-members`,
//! `--flow-table-size`) without losing a service or a tracked flow. The Maglev tables' size and
//! seed must stay: they decide where every untracked flow goes.
//!
//! 1. The new maps are created, with a new program, in a directory beside the pins.
//! 2. Everything the old maps hold is copied into them at the same ids (services, backends,
//!    memberships, tables, counters, flows); the VIP filter, whose size follows the room for
//!    services, gets the bits of the copied services.
//! 3. The new maps' pins replace the old ones (rename on bpffs), so readers and the next writer
//!    see the new maps.
//! 4. `attach` moves the pinned links to the new program (`bpf_link_update`): from then on no
//!    packet touches the old maps.
//! 5. The flows the old program created between 2 and 4 are copied again (`OldFlows`).
//!
//! What is copied, and how, is `spec::MAPS`'s `copy` column: every map of the table is copied (or
//! skipped for a stated reason) and renamed, so a new map cannot be left behind.
use super::{
    load::{Programs, load_programs, pinned_table},
    maps::Maps,
    pins::{STAGING, down},
    sizing::TableConfig,
    spec::{self, CopyHow, MapSpec},
};
use crate::error::{Error, Result};
use aya::maps::MapData;
use std::path::Path;

/// The pinned data plane's sizes, when it must be moved to `table`'s; an error when it cannot be.
pub(super) fn needed(dir: &Path, table: &TableConfig) -> Result<Option<TableConfig>> {
    let Ok(pinned) = pinned_table(dir) else {
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

/// The old data plane's maps that its program still adds to (`CopyHow::EntriesTwice`: the
/// flows) or tail-calls through (`CopyHow::Programs`), kept open until the links run the new
/// program.
pub(super) struct OldFlows(Vec<(&'static MapSpec, MapData)>);

impl OldFlows {
    fn open(dir: &Path) -> Result<OldFlows> {
        spec::MAPS
            .iter()
            .filter(|m| matches!(m.copy, CopyHow::EntriesTwice | CopyHow::Programs))
            // An older agent's data plane has no program arrays: its program calls none.
            .filter(|m| m.copy != CopyHow::Programs || dir.join(m.name).exists())
            .map(|m| Ok((m, spec::open_data(dir, m.name)?)))
            .collect::<Result<Vec<_>>>()
            .map(OldFlows)
    }

    /// Copies the flows again, once no packet reaches the old maps any more (and lets the old
    /// program arrays go).
    pub(super) fn copy_into(self, dir: &Path) -> Result<usize> {
        let mut n = 0;
        for (m, data) in self.0 {
            n += m.copy(data, dir)?;
        }
        Ok(n)
    }
}

/// Steps 1 to 3: returns the new program (loaded, not attached) and the old flow tables.
pub(super) fn prepare(
    dir: &Path,
    old: &TableConfig,
    new: &TableConfig,
    programs: Programs,
) -> Result<(aya::Ebpf, OldFlows)> {
    fits(dir, new)?;
    let staging = dir.join(STAGING);
    let _ = down(&staging);
    // The flow tables' seed is the same map in both (where each flow lives in the new tables
    // follows from it): pinned there before the load, which takes the pinned map.
    super::flow_tables::pin_seed(dir, &staging)?;
    let ebpf = load_programs(&staging, new, programs)?;
    let copied = copy_all(dir, &staging)
        .and_then(|()| super::maps::mark_vips(&staging))
        .and_then(|_| OldFlows::open(dir));
    let old_flows = match copied {
        Ok(f) => f,
        Err(e) => {
            // Nothing was replaced yet: the old data plane goes on as it was.
            let _ = down(&staging);
            return Err(e);
        }
    };
    for name in spec::MAPS.iter().map(|m| m.name) {
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

/// Step 2: every map of the spec table, as its `copy` says (at the same ids: arrays by index,
/// the tables of the services both sizes hold).
fn copy_all(from: &Path, to: &Path) -> Result<()> {
    for m in &spec::MAPS {
        match m.copy {
            CopyHow::Skip(why) => {
                tracing::debug!(map = m.name, why, "not copied");
                continue;
            }
            CopyHow::Programs => continue,
            _ => {}
        }
        let n = m.copy(spec::open_data(from, m.name)?, to)?;
        tracing::debug!(map = m.name, entries = n, "copied");
    }
    Ok(())
}
