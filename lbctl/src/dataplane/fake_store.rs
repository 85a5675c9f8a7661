//! A store that keeps in memory what the kernel's maps would hold, and can be told to fail
//! chosen operations: for tests of the writer and of what drives it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::{
    backend_vips::Record,
    maps::KernelState,
    sizing::TableConfig,
    writer::{Store, Writer},
};
use crate::{
    error::{Error, Result},
    model::Vip,
};
use lb_common::{Member, MemberKey, Service};
use std::{collections::BTreeMap, net::SocketAddr, ops::Range};

/// A writer over an empty fake store: tables of `ring` slots, room for `services`, `backends`
/// and `members`. Its backends' records drop a VIP at the first apply after the backend left it
/// (no grace), so that they hold what the memberships say after each apply.
pub(crate) fn writer(ring: u32, services: u32, backends: u32, members: u32) -> Writer<FakeStore> {
    let table = TableConfig::new(ring, 7)
        .unwrap()
        .with_capacity(services, backends, members)
        .unwrap();
    let store = FakeStore {
        ring,
        ..FakeStore::default()
    };
    let mut w = Writer::with_store(store, KernelState::default(), table);
    w.set_record_grace(std::time::Duration::ZERO);
    w
}

/// What the kernel's maps would hold, and the operations that fail.
#[derive(Debug, Default)]
pub(crate) struct FakeStore {
    pub(crate) services: BTreeMap<Vip, Service>,
    pub(crate) members: BTreeMap<(u32, u32), u32>,
    pub(crate) backends: BTreeMap<u32, SocketAddr>,
    /// `lb_svcdep_v1`: departures counts by service id.
    pub(crate) departures: BTreeMap<u32, u32>,
    /// Tables by what the service's entry names them by (class and block): the backend id of
    /// each slot. A block is taken from its write until it
    /// is freed.
    pub(crate) tables: BTreeMap<u32, Vec<u32>>,
    /// The configured table size: a table written must have its class's size (0: unchecked).
    pub(crate) ring: u32,
    /// Blocks freed while no table was in them, or twice.
    pub(crate) bad_frees: Vec<u32>,
    pub(crate) ops: usize,
    /// Operations (counted from 0) that fail.
    pub(crate) failing: Range<usize>,
    /// `lb_bevip_v1`: each backend's id and VIPs (not counted in `ops`).
    pub(crate) backend_vips: BTreeMap<SocketAddr, Record>,
    /// Writes of `backend_vips` fail.
    pub(crate) vips_failing: bool,
    /// Writes of `backend_vips` tried.
    pub(crate) vips_writes: usize,
    /// As maps made empty by this process (`Writer::open_made`): an id's first
    /// `reset_traffic` says there was nothing to zero.
    pub(crate) made_empty: bool,
    /// The (service?, id) pairs `reset_traffic` has seen.
    pub(crate) touched: std::collections::BTreeSet<(bool, u32)>,
}

impl FakeStore {
    fn op(&mut self, what: &str) -> Result<()> {
        let n = self.ops;
        self.ops += 1;
        if self.failing.contains(&n) {
            return Err(Error::io(
                format!("{what} (operation {n})"),
                std::io::Error::other("injected failure"),
            ));
        }
        Ok(())
    }
}

impl Store for FakeStore {
    fn set_member(&mut self, key: MemberKey, member: Member) -> Result<()> {
        self.op("set_member")?;
        self.members
            .insert((key.service, key.backend), member.state);
        Ok(())
    }
    fn remove_member(&mut self, key: MemberKey) -> Result<()> {
        self.op("remove_member")?;
        self.members.remove(&(key.service, key.backend));
        Ok(())
    }
    fn set_service(&mut self, vip: &Vip, service: Service) -> Result<()> {
        self.op("set_service")?;
        self.services.insert(*vip, service);
        Ok(())
    }
    fn remove_service(&mut self, vip: &Vip) -> Result<()> {
        self.op("remove_service")?;
        self.services.remove(vip);
        Ok(())
    }
    fn departures(&mut self, id: u32) -> Result<u32> {
        self.op("departures")?;
        Ok(self.departures.get(&id).copied().unwrap_or(0))
    }
    fn set_departures(&mut self, id: u32, departures: u32) -> Result<()> {
        self.op("set_departures")?;
        self.departures.insert(id, departures);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, addr: Option<SocketAddr>) -> Result<()> {
        self.op("set_backend")?;
        match addr {
            Some(a) => self.backends.insert(id, a),
            None => self.backends.remove(&id),
        };
        Ok(())
    }
    fn reset_traffic(&mut self, service: bool, id: u32) -> Result<bool> {
        self.op("reset_traffic")?;
        Ok(self.touched.insert((service, id)) && self.made_empty)
    }
    fn reserve_tables(&mut self, _: &BTreeMap<u32, usize>) -> Result<()> {
        Ok(())
    }
    fn write_table(&mut self, class: u32, slots: &[u32]) -> Result<u32> {
        self.op("write_table")?;
        let size = lb_common::table_size(class, self.ring) as usize;
        assert!(
            self.ring == 0 || slots.len() == size,
            "a table of {} slots written as class {class} ({size} slots)",
            slots.len()
        );
        let taken: std::collections::BTreeSet<u32> = self
            .tables
            .keys()
            .map(|t| lb_common::ref_block(*t))
            .collect();
        let block = (0..).find(|b| !taken.contains(b)).unwrap_or(0);
        let table = lb_common::table_ref(class, block);
        self.tables.insert(table, slots.to_vec());
        Ok(table)
    }
    fn free_table(&mut self, table: u32) {
        if table != lb_common::NO_TABLE && self.tables.remove(&table).is_none() {
            self.bad_frees.push(table);
        }
    }
    fn trim_tables(&mut self) -> Result<()> {
        Ok(())
    }
    fn set_backend_vips(&mut self, addr: SocketAddr, rec: &Record) -> Result<()> {
        self.vips_writes += 1;
        if self.vips_failing {
            return Err(Error::io(
                "set_backend_vips",
                std::io::Error::other("injected failure"),
            ));
        }
        if rec.vips.is_empty() {
            self.backend_vips.remove(&addr);
        } else {
            self.backend_vips.insert(addr, rec.clone());
        }
        Ok(())
    }
}
