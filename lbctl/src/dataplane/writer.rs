//! Writing the difference between what the maps hold and what is wanted (`Writer`), through the
//! map operations of `Store`: the kernel's maps, or a fake in the unit tests that makes any
//! operation fail. The writer's mirror follows what the maps hold on every path, failures
//! included.
use super::{
    backend_vips::{self, BackendVipMaps},
    maps::{KernelService, KernelState, Key, Maps},
    sizing::TableConfig,
    sys::Family,
    tables::Tables,
};
use crate::{
    error::{Error, Result},
    maglev,
    model::{BackendState, Desired, Proto, ServiceSpec, Vip},
};
use aya::maps::{IterableMap, MapError};
use lb_common::{MEMBER_ACTIVE, MEMBER_DRAINING, Member, MemberKey, NO_TABLE, Service};
use serde::Serialize;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::Path,
};

/// The map operations the writer makes. A failed operation changes nothing.
pub trait Store {
    /// Writes a membership.
    fn set_member(&mut self, key: MemberKey, member: Member) -> Result<()>;
    /// Writes memberships in order, as `set_member` would one after the other, and says how
    /// many were written before one failed (the kernel's store: with one system call).
    fn set_members(&mut self, members: &[(MemberKey, Member)]) -> (usize, Result<()>) {
        one_by_one(members, |(key, member)| self.set_member(*key, *member))
    }
    /// Removes a membership; one that is not there is not an error.
    fn remove_member(&mut self, key: MemberKey) -> Result<()>;
    /// Writes a service's entry.
    fn set_service(&mut self, vip: &Vip, service: Service) -> Result<()>;
    /// Writes services' entries in order, as `set_service` would one after the other, and says
    /// how many were written before one failed (the kernel's store: one system call for each
    /// run of one family).
    fn set_services(&mut self, services: &[(Vip, Service)]) -> (usize, Result<()>) {
        one_by_one(services, |(vip, service)| self.set_service(vip, *service))
    }
    /// Removes a service's entry; one that is not there is not an error.
    fn remove_service(&mut self, vip: &Vip) -> Result<()>;
    /// The departures count service id `id` holds in `lb_svcdep_v1` (0 without the map).
    fn departures(&mut self, id: u32) -> Result<u32>;
    /// Writes service id `id`'s departures count in `lb_svcdep_v1` (nothing without the map).
    fn set_departures(&mut self, id: u32, departures: u32) -> Result<()>;
    /// Writes backend slot `id` (in the array of the address's family), or clears it in both.
    fn set_backend(&mut self, id: u32, addr: Option<SocketAddr>) -> Result<()>;
    /// Writes backend slots in order, as `set_backend` would one after the other, and says how
    /// many were written before one failed (the kernel's store: one system call for each run of
    /// one family).
    fn set_backends(&mut self, backends: &[(u32, SocketAddr)]) -> (usize, Result<()>) {
        one_by_one(backends, |(id, addr)| self.set_backend(*id, Some(*addr)))
    }
    /// Zeroes a service's (`service`) or backend's counters. True when there was nothing to
    /// zero: no entry has named the id since the maps were made empty (`Writer::open_made`), so
    /// no program has counted or noted anything under it.
    fn reset_traffic(&mut self, service: bool, id: u32) -> Result<bool>;
    /// Makes sure blocks for tables are free, `n` of each size class (`wanted`: class -> n; the
    /// chunks it makes, with one system call).
    fn reserve_tables(&mut self, wanted: &BTreeMap<u32, usize>) -> Result<()>;
    /// Writes a table of size class `class` (one backend id per slot) into a free block and
    /// returns what the service's entry names it by (`lb_common::table_ref`), taken until
    /// `free_table`.
    fn write_table(&mut self, class: u32, slots: &[u32]) -> Result<u32>;
    /// Gives back a table no service's entry names any more.
    fn free_table(&mut self, table: u32);
    /// Removes the chunks of tables no service uses.
    fn trim_tables(&mut self) -> Result<()>;
    /// Records that the backend `addr` (slot `id`) serves `vips` (`lb_bevip_v1`); none: that it
    /// serves no VIP.
    fn set_backend_vips(&mut self, addr: SocketAddr, rec: &backend_vips::Record) -> Result<()>;
    /// Writes backends' records in order, as `set_backend_vips` would one after the other, and
    /// says how many were written before one failed (the kernel's store: one system call for
    /// each run of one family, when no record is empty).
    fn set_backends_vips(
        &mut self,
        records: &[(SocketAddr, &backend_vips::Record)],
    ) -> (usize, Result<()>) {
        one_by_one(records, |(addr, rec)| self.set_backend_vips(*addr, rec))
    }
    /// Prepares for writing the services of `vips` (their VIP filter bits at once); a failure
    /// only leaves the work to `set_service`.
    fn prepare_services(&mut self, _vips: &[Vip]) -> Result<()> {
        Ok(())
    }
    /// Undoes what `prepare_services` did for the services that were not written.
    fn services_written(&mut self) {}
}

/// Writes `items` one after the other with `write` until one fails: how many were written
/// before, and its error (what the batch writes of `Store` answer).
pub(super) fn one_by_one<T>(
    items: &[T],
    mut write: impl FnMut(&T) -> Result<()>,
) -> (usize, Result<()>) {
    for (done, item) in items.iter().enumerate() {
        if let Err(e) = write(item) {
            return (done, Err(e));
        }
    }
    (items.len(), Ok(()))
}

/// The kernel's maps pinned in a directory, as the writer's `Store`.
pub struct KernelStore {
    maps: Maps,
    tables: Tables,
    members: u32,
    /// None for a data plane loaded from an object without them.
    vips: Option<BackendVipMaps>,
    /// What `lb_svcdep_v1` holds, read once when the maps are opened: this store is its only
    /// writer (the programs only read it), so a new service's id costs no lookup.
    departures: Vec<u32>,
    /// On maps made empty by this process (`Writer::open_made`): the service and backend ids
    /// never given out since, whose counters are therefore still the zeroes the kernel made
    /// them with. None: not known (maps adopted from before).
    untouched: Option<Untouched>,
}

/// Ids whose counters no program can have touched: no service entry has named them since the
/// maps were made empty.
struct Untouched {
    services: Vec<bool>,
    backends: Vec<bool>,
}

impl Untouched {
    /// Every id below `services` and `backends`.
    fn new(services: u32, backends: u32) -> Untouched {
        Untouched {
            services: vec![true; services as usize],
            backends: vec![true; backends as usize],
        }
    }

    /// Whether the service's (`service`) or backend's id `id` was untouched; it is not any more.
    fn take(&mut self, service: bool, id: u32) -> bool {
        let ids = match service {
            true => &mut self.services,
            false => &mut self.backends,
        };
        ids.get_mut(id as usize)
            .map(|u| std::mem::replace(u, false))
            .unwrap_or(false)
    }
}

impl KernelStore {
    /// The error of a membership's write that the kernel refused with `errno`: a full hash map
    /// refuses a new key with E2BIG.
    fn member_error(&self, errno: Option<i32>, e: impl FnOnce() -> Error) -> Error {
        match errno {
            Some(libc::E2BIG) => Error::Full(format!(
                "all {} membership slots are in use (raise --max-members)",
                self.members
            )),
            _ => e(),
        }
    }
}

impl Store for KernelStore {
    fn set_member(&mut self, key: MemberKey, member: Member) -> Result<()> {
        self.maps
            .members
            .insert(key, member, 0)
            .map_err(|e| match &e {
                MapError::SyscallError(c) => self.member_error(c.io_error.raw_os_error(), || {
                    Error::map("writing lb_member_v1", e)
                }),
                _ => Error::map("writing lb_member_v1", e),
            })
    }

    fn set_members(&mut self, members: &[(MemberKey, Member)]) -> (usize, Result<()>) {
        let (keys, values): (Vec<MemberKey>, Vec<Member>) = members.iter().copied().unzip();
        match super::sys::map_update_batch(IterableMap::map(&self.maps.members), &keys, &values) {
            Ok(()) => (members.len(), Ok(())),
            Err((done, e)) => (
                done,
                Err(self.member_error(e.raw_os_error(), || Error::io("writing lb_member_v1", e))),
            ),
        }
    }

    fn remove_member(&mut self, key: MemberKey) -> Result<()> {
        match self.maps.members.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::map("removing from lb_member_v1", e)),
        }
    }

    fn set_service(&mut self, vip: &Vip, service: Service) -> Result<()> {
        // The VIP's bit first: the program must never miss a service that is written.
        let new = match self.maps.vip_filter.as_mut() {
            Some(filter) => filter.add(vip)?,
            None => false,
        };
        let written = match Key::of(vip) {
            Key::V4(k) => self.maps.services.insert(k, service, 0),
            Key::V6(k) => self.maps.services6.insert(k, service, 0),
        };
        if written.is_err()
            && new
            && let Some(filter) = self.maps.vip_filter.as_mut()
            && let Err(e) = filter.remove(vip)
        {
            // A new service that is not in the map: its bit is only a stale one.
            tracing::warn!(%vip, error = %e, "VIP filter: the unwritten service's bit is left set");
        }
        written.map_err(|e| Error::map("writing the service", e))
    }

    fn set_services(&mut self, services: &[(Vip, Service)]) -> (usize, Result<()>) {
        // The VIPs' bits first, as `set_service` sets each: the program must never miss a
        // service that is written. `new`: whether each bit was set here.
        let mut new = Vec::with_capacity(services.len());
        let mut result = Ok(());
        for (vip, _) in services {
            match self
                .maps
                .vip_filter
                .as_mut()
                .map_or(Ok(false), |f| f.add(vip))
            {
                Ok(n) => new.push(n),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Then each run of one family's entries in one write.
        let ready: Vec<Family<_, Service, _, Service>> = services[..new.len()]
            .iter()
            .map(|(vip, svc)| match Key::of(vip) {
                Key::V4(k) => Family::V4(k, *svc),
                Key::V6(k) => Family::V6(k, *svc),
            })
            .collect();
        let done = match super::sys::update_by_family(
            IterableMap::map(&self.maps.services),
            IterableMap::map(&self.maps.services6),
            &ready,
        ) {
            Ok(()) => ready.len(),
            Err((n, e)) => {
                result = Err(Error::io("writing the services", e));
                n
            }
        };
        // A new service that is not in the map: its bit is only a stale one.
        for ((vip, _), _) in services[done..]
            .iter()
            .zip(&new[done.min(new.len())..])
            .filter(|(_, n)| **n)
        {
            if let Some(filter) = self.maps.vip_filter.as_mut()
                && let Err(e) = filter.remove(vip)
            {
                tracing::warn!(%vip, error = %e, "VIP filter: the unwritten service's bit is left set");
            }
        }
        (done, result)
    }

    fn remove_service(&mut self, vip: &Vip) -> Result<()> {
        let removed = match Key::of(vip) {
            Key::V4(k) => self.maps.services.remove(&k),
            Key::V6(k) => self.maps.services6.remove(&k),
        };
        match removed {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map("removing a service", e)),
        }
        // The service is gone: a bit that could not be cleared only costs the lookup it spares.
        if let Some(filter) = self.maps.vip_filter.as_mut()
            && let Err(e) = filter.remove(vip)
        {
            tracing::warn!(%vip, error = %e, "VIP filter: the service's bit is left set");
        }
        Ok(())
    }

    fn departures(&mut self, id: u32) -> Result<u32> {
        Ok(self.departures.get(id as usize).copied().unwrap_or(0))
    }

    fn set_departures(&mut self, id: u32, departures: u32) -> Result<()> {
        let Some(map) = self.maps.departures.as_mut() else {
            return Ok(());
        };
        map.set(id, departures, 0)
            .map_err(|e| Error::map(format!("writing {}", lb_common::MAP_DEPARTURES), e))?;
        if let Some(d) = self.departures.get_mut(id as usize) {
            *d = departures;
        }
        Ok(())
    }

    fn set_backend(&mut self, id: u32, addr: Option<SocketAddr>) -> Result<()> {
        self.maps.set_backend(id, addr)
    }

    fn set_backends(&mut self, backends: &[(u32, SocketAddr)]) -> (usize, Result<()>) {
        self.maps.set_backends(backends)
    }

    fn set_backend_vips(&mut self, addr: SocketAddr, rec: &backend_vips::Record) -> Result<()> {
        match self.vips.as_mut() {
            Some(m) => m.set(addr, rec),
            None => Ok(()),
        }
    }

    fn set_backends_vips(
        &mut self,
        records: &[(SocketAddr, &backend_vips::Record)],
    ) -> (usize, Result<()>) {
        match self.vips.as_mut() {
            Some(m) => m.set_many(records),
            None => (records.len(), Ok(())),
        }
    }

    fn prepare_services(&mut self, vips: &[Vip]) -> Result<()> {
        match self.maps.vip_filter.as_mut() {
            Some(filter) => filter.mark_ahead(vips.iter()),
            None => Ok(()),
        }
    }

    fn services_written(&mut self) {
        if let Some(filter) = self.maps.vip_filter.as_mut() {
            filter.drop_ahead();
        }
    }

    fn reset_traffic(&mut self, service: bool, id: u32) -> Result<bool> {
        if self.untouched.as_mut().is_some_and(|u| u.take(service, id)) {
            return Ok(true);
        }
        self.maps.reset_traffic(service, id).map(|()| false)
    }

    fn reserve_tables(&mut self, wanted: &BTreeMap<u32, usize>) -> Result<()> {
        self.tables.reserve(wanted)
    }

    fn write_table(&mut self, class: u32, slots: &[u32]) -> Result<u32> {
        self.tables.write(class, slots, |_| true)
    }

    fn free_table(&mut self, table: u32) {
        self.tables.free(table)
    }

    fn trim_tables(&mut self) -> Result<()> {
        self.tables.trim().map(|_| ())
    }
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Applied {
    /// Services written for the first time.
    pub added: Vec<String>,
    /// Services whose backends changed.
    pub changed: Vec<String>,
    /// Services removed.
    pub removed: Vec<String>,
    /// Services that were already as wanted.
    pub unchanged: usize,
    /// Services that could not be written, with why. The kernel keeps what it had for them.
    pub failed: Vec<String>,
}

impl Applied {
    /// True when nothing was written and nothing failed.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.failed.is_empty()
    }
}

/// Writes differences into the maps, keeping a mirror of what they hold.
pub struct Writer<S: Store = KernelStore> {
    store: S,
    state: KernelState,
    /// Services of the mirror whose entry the kernel does not hold (its removal went through
    /// but not all of its memberships', or a first write failed and could not be taken back):
    /// written again however they compare.
    unlisted: BTreeSet<Vip>,
    table: TableConfig,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// How long the last `apply` took.
    last_apply: std::time::Duration,
    /// True once unused backend slots were freed after an apply (those a previous agent left
    /// are freed by the first one); from then on only `maybe_unused` are looked at.
    collected: bool,
    /// Backend addresses that left a service, or got a slot, since unused slots were last
    /// freed: the only ones that can have become unused.
    maybe_unused: BTreeSet<SocketAddr>,
    /// For each backend address, the services of the mirror it is a member of (how many): a
    /// slot whose address has none is unused, found without a look at every service (which
    /// took most of a one-task change's writing at 10,000 services). Kept by the `mirror_*`
    /// methods, the only ones that change a service's members in `state`.
    users: HashMap<SocketAddr, u32>,
    /// Each backend's slot and VIPs as `lb_bevip_v1` records them (`Store::set_backend_vips`).
    served: backend_vips::Served,
    /// VIPs the record keeps for a backend that no longer serves them, since when: taken out
    /// `record_grace` later (`expire_records`), so that the replies of the backend's lean flows
    /// still come from the VIP meanwhile, as reverse entries make them for the other flows.
    leaving: BTreeMap<(SocketAddr, Vip), std::time::Instant>,
    record_grace: std::time::Duration,
}

/// How long a backend's record keeps a VIP after the backend stopped serving it.
pub const RECORD_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// The slots of the Maglev tables built together, at most (4 MiB): 64 tables of the default
/// size, or about 2,000 of services of five backends (509 slots each). A batch starts threads to build its tables
/// on every CPU, so the fewer batches the better.
const TABLE_BATCH_SLOTS: usize = 1 << 20;

/// The names of a service's active backends in address order: what its Maglev table is built
/// over.
fn active_names(backends: &BTreeMap<SocketAddr, BackendState>) -> Vec<String> {
    backends
        .iter()
        .filter(|(_, st)| **st == BackendState::Active)
        .map(|(a, _)| a.to_string())
        .collect()
}

impl<S: Store> Writer<S> {
    /// Whether a service's table in the kernel has the size class its active backends give it
    /// (a table an agent before size classes wrote has the configured size, class 0: the
    /// service is written again, so that every agent of this version sends its new flows alike).
    fn table_fits(&self, cur: &KernelService) -> bool {
        let active = cur
            .backends
            .values()
            .filter(|(_, st)| *st == BackendState::Active)
            .count();
        cur.table == NO_TABLE || lb_common::ref_class(cur.table) == self.table.class_for(active)
    }
}

/// Whether the mirror's service holds exactly the backends (and states) `spec` wants.
fn same_backends(cur: &KernelService, spec: &ServiceSpec) -> bool {
    cur.backends.len() == spec.backends.len()
        && cur
            .backends
            .iter()
            .map(|(a, (_, st))| (a, *st))
            .eq(spec.backends.iter().map(|(a, b)| (a, b.state)))
}

/// The memberships of service `id` in backends `staged` (`Writer::stage_backends`), as
/// `Store::set_members` takes them.
fn member_entries(
    id: u32,
    staged: &[(SocketAddr, u32, BackendState, bool)],
) -> impl Iterator<Item = (MemberKey, Member)> + '_ {
    staged.iter().map(move |(_, bid, st, _)| {
        let key = MemberKey {
            service: id,
            backend: *bid,
        };
        (key, member_of(*st))
    })
}

fn member_of(st: BackendState) -> Member {
    Member {
        state: match st {
            BackendState::Active => MEMBER_ACTIVE,
            BackendState::Draining => MEMBER_DRAINING,
        },
        _pad: 0,
    }
}

/// Ids below a limit: the lowest free one is given out first, in O(log n) however many are used.
#[derive(Debug)]
struct IdPool {
    /// Ids below `next` that are free again.
    free: BTreeSet<u32>,
    next: u32,
    limit: u32,
    what: &'static str,
}

impl IdPool {
    fn new(used: impl IntoIterator<Item = u32>, limit: u32, what: &'static str) -> IdPool {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(0, |m| m + 1);
        IdPool {
            free: (0..next).filter(|i| !used.contains(i)).collect(),
            next,
            limit,
            what,
        }
    }

    fn take(&mut self) -> Result<u32> {
        if let Some(id) = self.free.pop_first() {
            return Ok(id);
        }
        if self.next >= self.limit {
            return Err(Error::Full(format!(
                "all {} {} slots are in use (raise --max-{}s)",
                self.limit, self.what, self.what
            )));
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    fn give_back(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

impl Writer<KernelStore> {
    /// Opens the maps pinned in `dir` and adopts what they hold.
    pub fn open(dir: &Path) -> Result<Writer> {
        Writer::open_maps(dir, false)
    }

    /// `open` for maps this process has just made empty (`make_maps`, or a load into a fresh
    /// pin directory), before any program of theirs was attached: the counters of an id no
    /// service or backend has had since are the kernel's zeroes, so giving it out writes none
    /// (two system calls a new service and a new backend of a first apply). Maps that hold a
    /// service or a live backend slot were not made empty: opened as `open` does.
    pub fn open_made(dir: &Path) -> Result<Writer> {
        Writer::open_maps(dir, true)
    }

    fn open_maps(dir: &Path, made: bool) -> Result<Writer> {
        let mut maps = Maps::open(dir)?;
        let state = maps.read()?;
        let table = maps.table()?;
        let orphans = maps.orphan_backends(&state, table.backends)?;
        let mut tables = Tables::open(dir, table.size)?;
        tables.adopt(state.services.values().map(|s| s.table))?;
        if let Some(filter) = maps.vip_filter.as_mut() {
            filter.adopt(state.services.keys());
        }
        // The loader added the pinned memberships' VIPs to the record; a writer that did not
        // load (a command run beside an older agent) makes sure of it too.
        let mut vips = BackendVipMaps::open(dir)?;
        let record = match vips.as_mut() {
            Some(m) => Some(m.ensure(&backend_vips::served(&state))?.0),
            None => None,
        };
        let departures = match maps.departures.as_ref() {
            Some(map) => super::sys::array_read_batch(IterableMap::map(map), map.len())
                .map_err(|e| Error::io(format!("reading {}", lb_common::MAP_DEPARTURES), e))?,
            None => Vec::new(),
        };
        let empty = state.services.is_empty() && state.backend_ids.is_empty() && orphans.is_empty();
        let store = KernelStore {
            maps,
            tables,
            members: table.members,
            vips,
            departures,
            untouched: (made && empty).then(|| Untouched::new(table.services, table.backends)),
        };
        let mut w = Writer::with_store(store, state, table);
        if let Some(record) = record {
            w.adopt_record(record);
        }
        for id in orphans {
            w.store.set_backend(id, None)?;
        }
        Ok(w)
    }
}

impl<S: Store> Writer<S> {
    /// A writer of `store`, which holds `state`, sized `table`.
    pub(crate) fn with_store(store: S, state: KernelState, table: TableConfig) -> Writer<S> {
        let service_ids = IdPool::new(
            state.services.values().map(|s| s.id),
            table.services,
            "service",
        );
        let backend_ids = IdPool::new(
            state.backend_ids.values().copied(),
            table.backends,
            "backend",
        );
        let served = backend_vips::served(&state);
        let mut users = HashMap::new();
        for s in state.services.values() {
            count_users(&mut users, s.backends.keys(), true);
        }
        Writer {
            users,
            served,
            leaving: BTreeMap::new(),
            record_grace: RECORD_GRACE,
            store,
            state,
            unlisted: BTreeSet::new(),
            table,
            service_ids,
            backend_ids,
            last_apply: std::time::Duration::ZERO,
            collected: false,
            maybe_unused: BTreeSet::new(),
        }
    }

    /// How long the last `apply` took (diff, tables, map writes).
    pub fn last_apply(&self) -> std::time::Duration {
        self.last_apply
    }

    /// What the maps hold, as this writer knows it.
    pub fn state(&self) -> &KernelState {
        &self.state
    }

    /// The sizes of the data plane this writer writes.
    pub fn table(&self) -> TableConfig {
        self.table
    }

    #[cfg(test)]
    pub(super) fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    #[cfg(test)]
    pub(crate) fn store(&self) -> &S {
        &self.store
    }

    /// True when the mirror holds no service whose entry the kernel lacks (none is waiting
    /// to be written again whatever it compares to).
    pub fn settled(&self) -> bool {
        self.unlisted.is_empty()
    }

    #[cfg(test)]
    pub(super) fn is_unlisted(&self, vip: &Vip) -> bool {
        self.unlisted.contains(vip)
    }

    /// Makes the kernel serve `desired`, writing only the services that differ. A service that
    /// cannot be written is reported and keeps what it had; the others go on.
    pub fn apply(&mut self, desired: &Desired) -> Applied {
        let start = std::time::Instant::now();
        let out = self.apply_all(desired);
        self.last_apply = start.elapsed();
        out
    }

    /// Writes the services of `changes` (None: remove it) as [`Writer::apply`] would write them
    /// were they all of `desired`, leaving every other service as it is: for a reconciler that
    /// knows what changed (`marathon::Merger`). The result counts the services left as they
    /// were among the unchanged ones.
    pub fn apply_changes(&mut self, changes: &[(Vip, Option<ServiceSpec>)]) -> Applied {
        let start = std::time::Instant::now();
        let gone = changes
            .iter()
            .filter(|(v, s)| s.is_none() && self.state.services.contains_key(v))
            .map(|(v, _)| *v)
            .collect();
        let wanted = changes
            .iter()
            .filter_map(|(v, s)| s.as_ref().map(|s| (v, s)));
        let mut out = self.apply_parts(gone, wanted);
        let written = out.added.len() + out.changed.len() + out.unchanged;
        out.unchanged += self.state.services.len().saturating_sub(written);
        self.last_apply = start.elapsed();
        out
    }

    fn apply_all(&mut self, desired: &Desired) -> Applied {
        let gone: Vec<Vip> = self
            .state
            .services
            .keys()
            .filter(|v| !desired.contains_key(v))
            .copied()
            .collect();
        self.apply_parts(gone, desired.iter())
    }

    /// Removes the services `gone`, then writes those of `wanted` that differ from the mirror.
    fn apply_parts<'a>(
        &mut self,
        gone: Vec<Vip>,
        wanted: impl Iterator<Item = (&'a Vip, &'a ServiceSpec)>,
    ) -> Applied {
        let mut out = Applied::default();
        for vip in gone {
            match self.remove_service(&vip) {
                Ok(()) => out.removed.push(vip.to_string()),
                Err(e) => out.failed.push(format!("{vip}: {e}")),
            }
        }
        // Only the services that differ from the mirror are built and written: compared
        // backend by backend in address order, without building either side.
        let mut to_write = Vec::new();
        for (vip, spec) in wanted {
            let existed = match self.state.services.get(vip) {
                Some(cur)
                    if same_backends(cur, spec)
                        && self.table_fits(cur)
                        && !self.unlisted.contains(vip) =>
                {
                    out.unchanged += 1;
                    continue;
                }
                Some(_) => true,
                None => false,
            };
            to_write.push((vip, spec.wanted(), existed));
        }
        // Per size class, a block for each service that gets a table of that class it did not
        // have, and one for those that change theirs within the class (each frees its old
        // block once it switched): the chunks this takes are made with one system call. A
        // failure here shows again on the service it leaves out.
        let mut wanted: BTreeMap<u32, usize> = BTreeMap::new();
        let mut changed = BTreeSet::new();
        let actives: Vec<usize> = to_write
            .iter()
            .map(|(_, backends, _)| {
                backends
                    .values()
                    .filter(|st| **st == BackendState::Active)
                    .count()
            })
            .collect();
        for ((vip, _, _), &active) in to_write.iter().zip(&actives) {
            if active == 0 {
                continue;
            }
            let class = self.table.class_for(active);
            let now = self.state.services.get(vip).map_or(NO_TABLE, |s| s.table);
            if now != NO_TABLE && lb_common::ref_class(now) == class {
                changed.insert(class);
            } else {
                *wanted.entry(class).or_default() += 1;
            }
        }
        for class in changed {
            *wanted.entry(class).or_default() += 1;
        }
        if let Err(e) = self.store.reserve_tables(&wanted) {
            tracing::debug!(error = %e, "could not make room for every table at once");
        }
        let new: Vec<Vip> = to_write
            .iter()
            .filter(|(_, _, existed)| !existed)
            .map(|(vip, _, _)| **vip)
            .collect();
        if let Err(e) = self.store.prepare_services(&new) {
            tracing::debug!(error = %e, "could not set the new services' VIP filter bits at once");
        }
        let mut unrecorded = self.record_ahead(&to_write);
        let mut not_written = BTreeSet::new();
        // The Maglev tables of a batch of services are built at once on every CPU, then written
        // one service after the other; a batch bounds the memory the tables take meanwhile.
        let mut batches = Vec::new();
        let (mut start, mut slots) = (0, 0);
        for (i, &active) in actives.iter().enumerate() {
            let n = self.table.size_for(active) as usize;
            if slots + n > TABLE_BATCH_SLOTS && i > start {
                batches.push(start..i);
                (start, slots) = (i, 0);
            }
            slots += n;
        }
        batches.push(start..to_write.len());
        for batch in batches.into_iter().map(|r| &to_write[r]) {
            let names: Vec<Vec<String>> = batch
                .iter()
                .map(|(_, backends, _)| active_names(backends))
                .collect();
            let table = self.table;
            let tables = maglev::tables(&names, |n| table.size_for(n), table.seed);
            // The services new to the maps, step by step over all of them (`write_new`).
            let new_at: Vec<usize> = (0..batch.len())
                .filter(|&i| !batch[i].2 && !unrecorded.contains_key(batch[i].0))
                .collect();
            let new: Vec<_> = new_at
                .iter()
                .map(|&i| (batch[i].0, &batch[i].1, tables[i].as_slice()))
                .collect();
            let mut done: Vec<Option<Result<()>>> = (0..batch.len()).map(|_| None).collect();
            for (i, r) in new_at.iter().zip(self.write_new(&new)) {
                done[*i] = Some(r);
            }
            for (((vip, backends, existed), slots), done) in batch.iter().zip(tables).zip(done) {
                let written = match (done, unrecorded.remove(*vip)) {
                    (Some(r), _) => r,
                    (None, Some(e)) => Err(e),
                    (None, None) => self.write_service(vip, backends, &slots),
                };
                match written {
                    Ok(()) if *existed => out.changed.push(vip.to_string()),
                    Ok(()) => out.added.push(vip.to_string()),
                    Err(e) => {
                        out.failed.push(format!("{vip}: {e}"));
                        not_written.insert(**vip);
                    }
                }
            }
        }
        // The VIP filter bits set ahead for services not written are cleared.
        self.store.services_written();
        // A VIP recorded ahead for a service whose write failed: out again where the backend
        // is not its member.
        for (vip, backends, _) in to_write.iter().filter(|w| not_written.contains(w.0)) {
            for addr in backends.keys() {
                let member = self
                    .state
                    .services
                    .get(*vip)
                    .is_some_and(|s| s.backends.contains_key(addr));
                if let (false, Some(id)) = (member, self.served.get(addr).map(|r| r.id)) {
                    self.unserve(*addr, id, vip);
                }
            }
        }
        // Backend slots are taken only by a service written: none can have become unused
        // when nothing was (but the first apply frees those a previous agent left).
        if !out.is_noop() || !self.collected {
            match self.collect_backends() {
                Ok(()) => self.collected = true,
                Err(e) => {
                    // The next apply looks at every slot again.
                    self.collected = false;
                    out.failed.push(format!("freeing unused backends: {e}"));
                }
            }
        }
        self.expire_records(false);
        if let Err(e) = self.store.trim_tables() {
            tracing::warn!(error = %e, "could not free the unused chunks of Maglev tables");
        }
        out
    }

    /// Writes a service whose Maglev table over its active backends (`active_names`) is `slots`.
    fn write_service(
        &mut self,
        vip: &Vip,
        backends: &BTreeMap<SocketAddr, BackendState>,
        slots: &[u32],
    ) -> Result<()> {
        let old_table = self.state.services.get(vip).map_or(NO_TABLE, |s| s.table);
        let (id, fresh) = match self.state.services.get(vip) {
            Some(cur) => (cur.id, false),
            None => self.new_service_id()?,
        };
        let mut written = Vec::new();
        let (members, svc) = match self.stage(vip, (id, fresh), backends, slots, &mut written) {
            Ok(done) => done,
            Err(e) => {
                self.undo_members(vip, id, &written);
                return Err(e);
            }
        };
        // The kernel serves the new table from here on: the mirror follows at once, keeping
        // the memberships of the backends that left until they are removed.
        let before = self
            .state
            .services
            .get(vip)
            .map(|s| s.backends.clone())
            .unwrap_or_default();
        let left: Vec<(SocketAddr, u32)> = before
            .iter()
            .filter(|(addr, _)| !members.contains_key(*addr))
            .map(|(addr, (bid, _))| (*addr, *bid))
            .collect();
        let mut held = members;
        for (addr, m) in before {
            held.entry(addr).or_insert(m);
        }
        self.mirror_insert(
            *vip,
            KernelService {
                id,
                table: svc.table,
                active: svc.active,
                backends: held,
                departures: svc.departures,
            },
        );
        self.unlisted.remove(vip);
        // No entry names the old table's block now.
        if old_table != svc.table {
            self.store.free_table(old_table);
        }
        // 4. Memberships of backends that left: their flows move on their next packet. Then the
        // service's departures count goes up, which makes every tracked flow of it look its
        // membership up again (the program skips that lookup for a flow it checked lately).
        let departed = !left.is_empty();
        for (addr, bid) in left {
            self.store.remove_member(MemberKey {
                service: id,
                backend: bid,
            })?;
            self.mirror_remove_member(vip, &addr);
            self.maybe_unused.insert(addr);
            self.leave(addr, vip);
        }
        if departed {
            // The id's count first: it ends the notes the program checks without the service.
            let svc = Service {
                departures: self.next_departures(id, svc.departures)?,
                ..svc
            };
            self.store.set_service(vip, svc)?;
            if let Some(s) = self.state.services.get_mut(vip) {
                s.departures = svc.departures;
            }
        }
        Ok(())
    }

    /// Steps 1 to 3 of `write_service`: memberships, the new table, the switch. Every
    /// membership written is pushed to `written`, so that a failure can be undone; the new
    /// table's block is given back when the entry cannot be written.
    #[allow(clippy::type_complexity)]
    fn stage(
        &mut self,
        vip: &Vip,
        (id, fresh): (u32, bool),
        backends: &BTreeMap<SocketAddr, BackendState>,
        slots: &[u32],
        written: &mut Vec<(SocketAddr, u32, BackendState)>,
    ) -> Result<(BTreeMap<SocketAddr, (u32, BackendState)>, Service)> {
        // 1. Backend slots and memberships first, so the new table only points at live slots.
        // The backends' VIPs before their memberships: a lean flow to another of a backend's
        // VIPs must never miss this one. The memberships then go in one write.
        let staged = self.stage_backends(vip, backends)?;
        let entries: Vec<(MemberKey, Member)> = member_entries(id, &staged).collect();
        let (done, set) = self.store.set_members(&entries);
        let done = done.min(staged.len());
        let mut members = BTreeMap::new();
        for (addr, bid, st, _) in &staged[..done] {
            written.push((*addr, *bid, *st));
            members.insert(*addr, (*bid, *st));
        }
        if let Err(e) = set {
            self.unserve_staged(vip, &staged[done..]);
            return Err(e);
        }
        // 2. The new table, into a free block.
        let (table, active) = self.write_table_of(&members, slots)?;
        // 3. One update switches the service to the new table, with its active count: a packet
        // sees the old table or the new one, never a mix.
        let departures = match self.state.services.get(vip) {
            Some(s) if !self.unlisted.contains(vip) => Ok(s.departures),
            _ => self.first_departures(id, fresh),
        };
        let written = departures.and_then(|departures| {
            let svc = Service {
                id,
                table,
                active,
                departures,
            };
            self.store.set_service(vip, svc).map(|()| svc)
        });
        match written {
            Ok(svc) => Ok((members, svc)),
            Err(e) => {
                self.store.free_table(table);
                Err(e)
            }
        }
    }

    /// A service id for a service new to the maps, its counters zeroed; true when the id is
    /// fresh (`Store::reset_traffic`).
    fn new_service_id(&mut self) -> Result<(u32, bool)> {
        let id = self.service_ids.take()?;
        match self.store.reset_traffic(true, id) {
            Ok(fresh) => Ok((id, fresh)),
            Err(e) => {
                self.service_ids.give_back(id);
                Err(e)
            }
        }
    }

    /// The departures count of a service new to its id (`fresh`: see `new_service_id`). It
    /// starts above the id's count, so that the notes taken for the id's previous services
    /// (`lb_svcdep_v1`) do not hold for it. A fresh id whose count is still the kernel's zero
    /// has had no service and no note since the maps were made: the service starts at that
    /// zero, and nothing is written (one system call a service of a first apply).
    fn first_departures(&mut self, id: u32, fresh: bool) -> Result<u32> {
        if fresh && self.store.departures(id)? == 0 {
            return Ok(0);
        }
        self.next_departures(id, 0)
    }

    /// Gives each of `backends` a slot and `vip` in its record (`serve`), for a write of the
    /// service's memberships: (address, slot, state, whether it is a member already). On a
    /// failure nothing is left recorded for the backends that were not members.
    #[allow(clippy::type_complexity)]
    fn stage_backends(
        &mut self,
        vip: &Vip,
        backends: &BTreeMap<SocketAddr, BackendState>,
    ) -> Result<Vec<(SocketAddr, u32, BackendState, bool)>> {
        let mut staged: Vec<(SocketAddr, u32, BackendState, bool)> = Vec::new();
        for (addr, st) in backends {
            let served = self.backend_id(*addr).and_then(|bid| {
                self.serve(*addr, bid, std::slice::from_ref(vip), true)
                    .map(|()| bid)
            });
            let bid = match served {
                Ok(bid) => bid,
                Err(e) => {
                    self.unserve_staged(vip, &staged);
                    return Err(e);
                }
            };
            let was = self
                .state
                .services
                .get(vip)
                .is_some_and(|s| s.backends.contains_key(addr));
            staged.push((*addr, bid, *st, was));
        }
        Ok(staged)
    }

    /// Writes the Maglev table `slots` of a service whose memberships are `members` into a free
    /// block: `slots` index the active backends in address order, as `members` holds them.
    /// Returns what the entry names it by (`NO_TABLE` without active backends) and how many
    /// backends are active.
    fn write_table_of(
        &mut self,
        members: &BTreeMap<SocketAddr, (u32, BackendState)>,
        slots: &[u32],
    ) -> Result<(u32, u32)> {
        let active: Vec<u32> = members
            .values()
            .filter(|(_, st)| *st == BackendState::Active)
            .map(|(id, _)| *id)
            .collect();
        if slots.is_empty() {
            return Ok((NO_TABLE, active.len() as u32));
        }
        let ids = slots
            .iter()
            .map(|b| active.get(*b as usize).copied())
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                Error::io(
                    "writing a Maglev table",
                    std::io::Error::other("the table names a backend the service lacks"),
                )
            })?;
        let table = self
            .store
            .write_table(self.table.class_for(active.len()), &ids)?;
        Ok((table, active.len() as u32))
    }

    /// Writes services the maps do not hold (`new`: each VIP with its backends and Maglev
    /// table), as `write_service` writes each one, but step by step over all of them: every
    /// service's backends and memberships (one write for all the memberships), then each
    /// table, then the entries (one write per run of one family). A service's entry still comes
    /// after its memberships and its table, and names only them: each service is served whole
    /// or not at all. Returns each service's result, in order. A service a step failed for is
    /// taken back and gets that step's error; the services a failed write of several did not
    /// reach are written alone afterwards, by `write_service`.
    fn write_new(
        &mut self,
        new: &[(&Vip, &BTreeMap<SocketAddr, BackendState>, &[u32])],
    ) -> Vec<Result<()>> {
        type Staged = Vec<(SocketAddr, u32, BackendState, bool)>;
        type Members = BTreeMap<SocketAddr, (u32, BackendState)>;
        let mut results: Vec<Option<Result<()>>> = (0..new.len()).map(|_| None).collect();
        let mut alone = Vec::new();
        // 1. Ids and backends.
        let mut staged: Vec<(usize, u32, bool, Staged)> = Vec::new();
        for (i, (vip, backends, _)) in new.iter().enumerate() {
            let (id, fresh) = match self.new_service_id() {
                Ok(got) => got,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            match self.stage_backends(vip, backends) {
                Ok(s) => staged.push((i, id, fresh, s)),
                Err(e) => {
                    self.service_ids.give_back(id);
                    results[i] = Some(Err(e));
                }
            }
        }
        // 2. Every membership in one write.
        let entries: Vec<(MemberKey, Member)> = staged
            .iter()
            .flat_map(|(_, id, _, s)| member_entries(*id, s))
            .collect();
        let (done, set) = self.store.set_members(&entries);
        let (mut left, mut failed) = match set {
            Ok(()) => (entries.len(), None),
            Err(e) => (done.min(entries.len()), Some(e)),
        };
        // 3. The tables and departures counts of the services whose memberships are all in.
        let mut ready: Vec<(usize, Members, Service)> = Vec::new();
        for (i, id, fresh, s) in staged {
            let vip = new[i].0;
            let done = left.min(s.len());
            left -= done;
            let written: Vec<(SocketAddr, u32, BackendState)> = s[..done]
                .iter()
                .map(|(a, b, st, _)| (*a, *b, *st))
                .collect();
            if done < s.len() {
                self.unserve_staged(vip, &s[done..]);
                self.undo_members(vip, id, &written);
                // The first service short of memberships is the one the write failed at.
                match failed.take() {
                    Some(e) => results[i] = Some(Err(e)),
                    None => alone.push(i),
                }
                continue;
            }
            let members: Members = written.iter().map(|(a, b, st)| (*a, (*b, *st))).collect();
            let table = self.write_table_of(&members, new[i].2);
            let svc = table.and_then(|(table, active)| {
                let departures = self.first_departures(id, fresh);
                if departures.is_err() {
                    self.store.free_table(table);
                }
                departures.map(|departures| Service {
                    id,
                    table,
                    active,
                    departures,
                })
            });
            match svc {
                Ok(svc) => ready.push((i, members, svc)),
                Err(e) => {
                    self.undo_members(vip, id, &written);
                    results[i] = Some(Err(e));
                }
            }
        }
        // 4. The entries.
        let services: Vec<(Vip, Service)> =
            ready.iter().map(|(i, _, svc)| (*new[*i].0, *svc)).collect();
        let (done, set) = self.store.set_services(&services);
        let mut failed = set.err();
        for (k, (i, members, svc)) in ready.into_iter().enumerate() {
            let vip = new[i].0;
            if k >= done {
                self.store.free_table(svc.table);
                let written: Vec<(SocketAddr, u32, BackendState)> =
                    members.iter().map(|(a, (b, st))| (*a, *b, *st)).collect();
                self.undo_members(vip, svc.id, &written);
                // The first service not written is the one the write failed at.
                match failed.take() {
                    Some(e) => results[i] = Some(Err(e)),
                    None => alone.push(i),
                }
                continue;
            }
            self.mirror_insert(
                *vip,
                KernelService {
                    id: svc.id,
                    table: svc.table,
                    active: svc.active,
                    backends: members,
                    departures: svc.departures,
                },
            );
            self.unlisted.remove(vip);
            results[i] = Some(Ok(()));
        }
        // The services a failed write of several did not reach, alone.
        alone.sort_unstable();
        for i in alone {
            let (vip, backends, slots) = new[i];
            results[i] = Some(self.write_service(vip, backends, slots));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::io(
                        "writing a new service",
                        std::io::Error::other("no step wrote it or said why (a bug)"),
                    ))
                })
            })
            .collect()
    }

    /// Takes `vip` back from the backends of `staged` that were not its members before
    /// (`stage`'s fourth field) and got no membership.
    fn unserve_staged(&mut self, vip: &Vip, staged: &[(SocketAddr, u32, BackendState, bool)]) {
        for (addr, bid, _, was) in staged {
            if !was {
                self.unserve(*addr, *bid, vip);
            }
        }
    }

    /// Raises service id `id`'s count in `lb_svcdep_v1` above both what it holds and `held`
    /// (the count of the service that has the id), and returns it. The count never goes down, so
    /// no note the program took for the id at an earlier count holds again.
    fn next_departures(&mut self, id: u32, held: u32) -> Result<u32> {
        let next = self.store.departures(id)?.max(held).wrapping_add(1);
        self.store.set_departures(id, next)?;
        Ok(next)
    }

    /// Puts back the memberships a failed `write_service` wrote: the service keeps exactly what
    /// it had (a membership that stayed behind would keep a flow on a backend no table has).
    /// What cannot be put back stays in the mirror, as the kernel holds it, and the service is
    /// written again by the next apply; its id is given back only when nothing is left.
    fn undo_members(&mut self, vip: &Vip, id: u32, written: &[(SocketAddr, u32, BackendState)]) {
        let before = self.state.services.get(vip).map(|s| s.backends.clone());
        let mut stuck = Vec::new();
        for (addr, bid, st) in written {
            let key = MemberKey {
                service: id,
                backend: *bid,
            };
            let was = before
                .as_ref()
                .and_then(|b| b.get(addr))
                .map(|(_, old)| *old);
            let undone = match was {
                Some(old) => self.store.set_member(key, member_of(old)),
                None => self.store.remove_member(key),
            };
            if was.is_none() && undone.is_ok() {
                self.unserve(*addr, *bid, vip);
            }
            if let Err(e) = undone {
                tracing::warn!(service = %vip, error = %e, "could not undo a membership");
                stuck.push((*addr, (*bid, *st)));
            }
        }
        if stuck.is_empty() {
            if before.is_none() {
                self.service_ids.give_back(id);
            }
            return;
        }
        if before.is_none() {
            // The kernel has memberships of a service it has no entry for.
            self.unlisted.insert(*vip);
        }
        let svc = self.state.services.entry(*vip).or_insert(KernelService {
            id,
            table: NO_TABLE,
            active: 0,
            backends: BTreeMap::new(),
            departures: 0,
        });
        for (addr, member) in stuck {
            if svc.backends.insert(addr, member).is_none() {
                count_users(&mut self.users, [&addr], true);
            }
        }
    }

    fn remove_service(&mut self, vip: &Vip) -> Result<()> {
        let Some(cur) = self.state.services.get(vip).cloned() else {
            return Ok(());
        };
        // The id's count first: no flow of this service goes on without its lookup.
        self.next_departures(cur.id, cur.departures)?;
        self.store.remove_service(vip)?;
        // No entry names its table's block now.
        self.store.free_table(cur.table);
        // The entry is gone: the mirror says so before the memberships go.
        self.unlisted.insert(*vip);
        if let Some(s) = self.state.services.get_mut(vip) {
            s.active = 0;
            s.table = NO_TABLE;
        }
        for (addr, (bid, _)) in &cur.backends {
            self.store.remove_member(MemberKey {
                service: cur.id,
                backend: *bid,
            })?;
            self.mirror_remove_member(vip, addr);
            self.maybe_unused.insert(*addr);
            self.leave(*addr, vip);
        }
        if let Some(gone) = self.state.services.remove(vip) {
            count_users(&mut self.users, gone.backends.keys(), false);
        }
        self.unlisted.remove(vip);
        self.service_ids.give_back(cur.id);
        Ok(())
    }

    /// Adds the VIPs of the services `to_write` to their backends' records before any of
    /// their memberships is written: a backend that comes to serve several VIPs of a protocol in
    /// one apply is then never one VIP's alone meanwhile, and its record can say that no lean
    /// flow holds it. Each backend's record is written once, with all the VIPs it gains (a
    /// first apply of 10,000 services wrote 50,000 records one VIP at a time, for 4,000
    /// backends). Returns the services whose VIP could not be added or backend not given a
    /// slot, with why: those are not written.
    fn record_ahead(
        &mut self,
        to_write: &[(&Vip, BTreeMap<SocketAddr, BackendState>, bool)],
    ) -> BTreeMap<Vip, Error> {
        let mut gains: BTreeMap<SocketAddr, Vec<Vip>> = BTreeMap::new();
        for (vip, backends, _) in to_write {
            for addr in backends.keys() {
                if !self.served.get(addr).is_some_and(|r| r.vips.contains(*vip)) {
                    gains.entry(*addr).or_default().push(**vip);
                }
            }
        }
        let mut failed = BTreeMap::new();
        let mut fail = |vips: &[Vip], addr: SocketAddr, e: &Error| {
            for vip in vips {
                failed.entry(*vip).or_insert_with(|| {
                    Error::io(
                        format!("recording the VIPs of backend {addr}"),
                        std::io::Error::other(e.to_string()),
                    )
                });
            }
        };
        // The slots of the backends new to the maps, then the records, a write each for all
        // (a first apply of 10,000 services: 4,000 of each, one system call apiece before).
        // The backend a write of slots stopped at gets its error; the record a write of
        // records stopped at is written again alone (`serve`, which makes room in a full map);
        // the backends after either are written one at a time.
        let (slots, slot_failed) = self.backends_ahead(gains.keys().copied());
        let mut records = Vec::new();
        let mut one_by_one = Vec::new();
        for (addr, vips) in gains {
            if let Some((at, e)) = &slot_failed
                && *at == addr
            {
                fail(&vips, addr, e);
                continue;
            }
            match slots.get(&addr) {
                Some(id) => {
                    if let Some(rec) = self.record_for(addr, *id, &vips, true) {
                        records.push((addr, vips, rec));
                    }
                }
                None => one_by_one.push((addr, vips)),
            }
        }
        let written: Vec<(SocketAddr, &backend_vips::Record)> =
            records.iter().map(|(addr, _, rec)| (*addr, rec)).collect();
        let (done, _) = self.store.set_backends_vips(&written);
        let mut records = records.into_iter();
        for (addr, _, rec) in records.by_ref().take(done) {
            self.recorded(addr, rec);
        }
        one_by_one.extend(records.map(|(addr, vips, _)| (addr, vips)));
        for (addr, vips) in one_by_one {
            let recorded = self
                .backend_id(addr)
                .and_then(|id| self.serve(addr, id, &vips, true));
            if let Err(e) = recorded {
                fail(&vips, addr, &e);
            }
        }
        failed
    }

    /// Gives the backends among `addrs` that have no slot one each, written with one write a
    /// family (`Store::set_backends`). Returns the slot of every backend of `addrs` that has
    /// one now, and the backend that taking an id or the write stopped at, with why; the ones
    /// after it have none (their ids given back), and `backend_id` will try them one at a time.
    fn backends_ahead(
        &mut self,
        addrs: impl Iterator<Item = SocketAddr>,
    ) -> (BTreeMap<SocketAddr, u32>, Option<(SocketAddr, Error)>) {
        let (mut slots, mut new, mut stopped) = (BTreeMap::new(), Vec::new(), None);
        for addr in addrs {
            if let Some(id) = self.state.backend_ids.get(&addr) {
                slots.insert(addr, *id);
                continue;
            }
            let taken =
                self.backend_ids
                    .take()
                    .and_then(|id| match self.store.reset_traffic(false, id) {
                        Ok(_) => Ok(id),
                        Err(e) => {
                            self.backend_ids.give_back(id);
                            Err(e)
                        }
                    });
            match taken {
                Ok(id) => new.push((id, addr)),
                Err(e) => {
                    stopped = Some((addr, e));
                    break;
                }
            }
        }
        let (done, set) = self.store.set_backends(&new);
        for (id, addr) in &new[..done] {
            self.state.backend_ids.insert(*addr, *id);
            self.maybe_unused.insert(*addr);
            slots.insert(*addr, *id);
        }
        for (id, _) in &new[done..] {
            self.backend_ids.give_back(*id);
        }
        if let (Some((_, addr)), Err(e)) = (new.get(done), set) {
            stopped = Some((*addr, e));
        }
        (slots, stopped)
    }

    /// Records that backend `addr` (slot `id`) serves `vips`, or (`serves` false) no longer
    /// does (`Store::set_backend_vips`): one write, none when the record says so already.
    fn serve(&mut self, addr: SocketAddr, id: u32, vips: &[Vip], serves: bool) -> Result<()> {
        let Some(rec) = self.record_for(addr, id, vips, serves) else {
            return Ok(());
        };
        if let Err(e) = self.store.set_backend_vips(addr, &rec) {
            if !serves || self.leaving.is_empty() {
                return Err(e);
            }
            // A full map: the VIPs kept for backends that left go first.
            tracing::warn!(error = %e, "backends' records full: the VIPs kept for backends that left are taken out early");
            self.expire_records(true);
            self.store.set_backend_vips(addr, &rec)?;
        }
        self.recorded(addr, rec);
        Ok(())
    }

    /// The record backend `addr` (slot `id`) gets when it serves `vips` (`serves`) or no longer
    /// does; None when its record says so already.
    fn record_for(
        &mut self,
        addr: SocketAddr,
        id: u32,
        vips: &[Vip],
        serves: bool,
    ) -> Option<backend_vips::Record> {
        if serves {
            for vip in vips {
                self.leaving.remove(&(addr, *vip));
            }
        }
        let before = self.served.get(&addr);
        let had = before.map_or(id, |r| r.id);
        let id = if serves { id } else { had };
        // Most calls find the record as it should be (a backend of many VIPs has a large one).
        let holds = |vip: &Vip| before.is_some_and(|r| r.vips.contains(vip));
        if vips.iter().all(|vip| holds(vip) == serves) && had == id {
            return None;
        }
        let mut set = before.map(|r| r.vips.clone()).unwrap_or_default();
        for vip in vips {
            if serves {
                set.insert(*vip);
            } else {
                set.remove(vip);
            }
        }
        // Once the programs may have made lean flows through the backend, its record says so
        // as long as it lives.
        let no_lean = before.is_none_or(|r| r.no_lean && !self.lean_possible(addr, &r.vips));
        Some(backend_vips::Record {
            id,
            vips: set,
            no_lean,
        })
    }

    /// Backend `addr`'s record `rec` is written.
    fn recorded(&mut self, addr: SocketAddr, rec: backend_vips::Record) {
        if rec.vips.is_empty() {
            self.served.remove(&addr);
        } else {
            self.served.insert(addr, rec);
        }
    }

    /// Whether the programs may have made lean flows through backend `addr` while its record
    /// named `vips`: they name exactly one VIP of a protocol, and the backend is a member of
    /// that VIP's service or left it lately (a VIP written ahead of its memberships, as
    /// `apply_parts` does, is neither yet).
    fn lean_possible(&self, addr: SocketAddr, vips: &BTreeSet<Vip>) -> bool {
        [Proto::Tcp, Proto::Udp].into_iter().any(|proto| {
            let mut of = vips.iter().filter(|v| v.proto == proto);
            match (of.next(), of.next()) {
                (Some(v), None) => {
                    self.leaving.contains_key(&(addr, *v))
                        || self
                            .state
                            .services
                            .get(v)
                            .is_some_and(|s| s.backends.contains_key(&addr))
                }
                _ => false,
            }
        })
    }

    /// `serve(.., false)` after a membership was taken back: a failure leaves the VIP recorded,
    /// which only makes the backend's new flows keep reverse entries.
    fn unserve(&mut self, addr: SocketAddr, id: u32, vip: &Vip) {
        if let Err(e) = self.serve(addr, id, std::slice::from_ref(vip), false) {
            tracing::warn!(service = %vip, backend = %addr, error = %e, "could not take a VIP out of a backend's record");
        }
    }

    /// The backend `addr` stopped serving `vip`: its record keeps the VIP for `record_grace`.
    fn leave(&mut self, addr: SocketAddr, vip: &Vip) {
        self.leaving
            .entry((addr, *vip))
            .or_insert_with(std::time::Instant::now);
    }

    /// Takes out of the backends' records the VIPs kept longer than `record_grace` (all of
    /// them: `all`). One that cannot be written stays for the next time.
    fn expire_records(&mut self, all: bool) {
        let now = std::time::Instant::now();
        let due: Vec<(SocketAddr, Vip)> = self
            .leaving
            .iter()
            .filter(|(_, since)| all || now.duration_since(**since) >= self.record_grace)
            .map(|(k, _)| *k)
            .collect();
        for (addr, vip) in due {
            let Some(id) = self.served.get(&addr).map(|r| r.id) else {
                self.leaving.remove(&(addr, vip));
                continue;
            };
            match self.serve(addr, id, &[vip], false) {
                Ok(()) => {
                    self.leaving.remove(&(addr, vip));
                }
                Err(e) => {
                    tracing::warn!(service = %vip, backend = %addr, error = %e, "could not take a VIP out of a backend's record");
                }
            }
        }
    }

    /// Adopts what the backends' records hold (`record`, which includes every membership's
    /// VIP): a VIP recorded that its backend does not serve gets the grace from now.
    fn adopt_record(&mut self, record: backend_vips::Served) {
        let serving = backend_vips::served(&self.state);
        for (addr, rec) in &record {
            for vip in &rec.vips {
                if !serving.get(addr).is_some_and(|s| s.vips.contains(vip)) {
                    self.leave(*addr, vip);
                }
            }
        }
        self.served = record;
    }

    /// Sets how long a backend's record keeps a VIP after the backend left it (for tests).
    pub fn set_record_grace(&mut self, grace: std::time::Duration) {
        self.record_grace = grace;
    }

    fn backend_id(&mut self, addr: SocketAddr) -> Result<u32> {
        if let Some(id) = self.state.backend_ids.get(&addr) {
            return Ok(*id);
        }
        let id = self.backend_ids.take()?;
        let written = self
            .store
            .reset_traffic(false, id)
            .and_then(|_| self.store.set_backend(id, Some(addr)));
        if let Err(e) = written {
            self.backend_ids.give_back(id);
            return Err(e);
        }
        self.state.backend_ids.insert(addr, id);
        self.maybe_unused.insert(addr);
        Ok(id)
    }

    /// How many services of the mirror each backend address is a member of (for tests).
    #[cfg(test)]
    pub(super) fn users(&self) -> &HashMap<SocketAddr, u32> {
        &self.users
    }

    /// Service `vip` of the mirror is `svc` from now on (its members counted in `users`).
    fn mirror_insert(&mut self, vip: Vip, svc: KernelService) {
        count_users(&mut self.users, svc.backends.keys(), true);
        if let Some(old) = self.state.services.insert(vip, svc) {
            count_users(&mut self.users, old.backends.keys(), false);
        }
    }

    /// Backend `addr` is no member of service `vip` in the mirror any more.
    fn mirror_remove_member(&mut self, vip: &Vip, addr: &SocketAddr) {
        if let Some(s) = self.state.services.get_mut(vip)
            && s.backends.remove(addr).is_some()
        {
            count_users(&mut self.users, [addr], false);
        }
    }

    /// Frees backend slots no service uses any more.
    fn collect_backends(&mut self) -> Result<()> {
        let maybe = std::mem::take(&mut self.maybe_unused);
        let unused = |a: &SocketAddr| !self.users.contains_key(a);
        let unused: Vec<SocketAddr> = if self.collected {
            maybe
                .into_iter()
                .filter(|a| self.state.backend_ids.contains_key(a) && unused(a))
                .collect()
        } else {
            self.state
                .backend_ids
                .keys()
                .filter(|a| unused(a))
                .copied()
                .collect()
        };
        for addr in unused {
            let Some(&id) = self.state.backend_ids.get(&addr) else {
                continue;
            };
            self.store.set_backend(id, None)?;
            self.state.backend_ids.remove(&addr);
            self.backend_ids.give_back(id);
        }
        Ok(())
    }
}

/// Counts each of `addrs` as a member of one service more (`more`) or one less in `users`,
/// which keeps only the addresses of some service.
fn count_users<'a>(
    users: &mut HashMap<SocketAddr, u32>,
    addrs: impl IntoIterator<Item = &'a SocketAddr>,
    more: bool,
) {
    for a in addrs {
        match (users.get_mut(a), more) {
            (Some(n), true) => *n += 1,
            (None, true) => {
                users.insert(*a, 1);
            }
            (Some(n), false) if *n > 1 => *n -= 1,
            (Some(_), false) => {
                users.remove(a);
            }
            (None, false) => {}
        }
    }
}
