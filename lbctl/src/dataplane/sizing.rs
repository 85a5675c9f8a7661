//! The data plane's sizes (`TableConfig`): the services' Maglev tables, the flow tables and the
//! room for services, backends and memberships, all fixed when the maps are created, and how
//! much of that room a state takes (`Usage`).
use crate::{
    error::{Error, Result},
    maglev,
};
use lb_common as common;
use serde::Serialize;

/// Refuses a room for services whose Maglev tables the machine could not hold once all are in
/// use, before anything is loaded: the tables are made one by one as services get backends, and
/// would otherwise fail late, one service at a time, with a bare ENOMEM.
pub(super) fn check_memory(table: &TableConfig) -> Result<()> {
    let needed = table.full_tables_bytes();
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    match available {
        Some(avail) if needed > avail / 2 => Err(Error::Memory {
            needed,
            available: avail,
            table: table.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The data plane's sizes: the services' Maglev tables (size, a prime, and seed), the flow
/// tables, and how many services, backends and memberships the maps hold. All are fixed when the
/// maps are created; `lb_cfg_v2` records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TableConfig {
    /// Slots of each service's Maglev table, a prime.
    pub size: u32,
    /// The seed of the Maglev permutations.
    pub seed: u64,
    /// Entries of each flow table (tracked flows per direction and family).
    pub flows: u32,
    /// Services (VIP, port, protocol) of both families together.
    pub services: u32,
    /// Distinct backends (address, port) of both families together.
    pub backends: u32,
    /// (service, backend) memberships.
    pub members: u32,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            size: common::DEFAULT_RING_SIZE,
            seed: maglev::DEFAULT_SEED,
            flows: common::MAX_FLOWS,
            services: common::DEFAULT_MAX_SERVICES,
            backends: common::DEFAULT_MAX_BACKENDS,
            members: common::DEFAULT_MAX_MEMBERS,
        }
    }
}

impl TableConfig {
    /// Checks that `size` is a prime from 3 to 131071.
    pub fn new(size: u32, seed: u64) -> std::result::Result<TableConfig, String> {
        let prime = size >= 3
            && (2..)
                .take_while(|d| d * d <= size)
                .all(|d| !size.is_multiple_of(d));
        if !prime || size > common::MAX_RING_SIZE {
            return Err(format!(
                "the Maglev table size must be a prime from 3 to {} (not {size})",
                common::MAX_RING_SIZE
            ));
        }
        Ok(TableConfig {
            size,
            seed,
            ..TableConfig::default()
        })
    }

    /// The same holding `services` services, `backends` backends and `members` memberships,
    /// checked against the limits and against the width of the table map's index.
    pub fn with_capacity(
        self,
        services: u32,
        backends: u32,
        members: u32,
    ) -> std::result::Result<TableConfig, String> {
        for (what, n, max) in [
            ("services", services, common::LIMIT_SERVICES),
            ("backends", backends, common::LIMIT_BACKENDS),
            ("memberships", members, common::LIMIT_MEMBERS),
        ] {
            if !(1..=max).contains(&n) {
                return Err(format!(
                    "the number of {what} must be from 1 to {max} (not {n})"
                ));
            }
        }
        let t = TableConfig {
            services,
            backends,
            members,
            ..self
        };
        Ok(t)
    }

    /// The size class of the Maglev table of a service with `active` active backends
    /// (`lb_common::table_class`): 100 slots per backend, at most `size`.
    pub fn class_for(&self, active: usize) -> u32 {
        common::table_class(u32::try_from(active).unwrap_or(u32::MAX), self.size)
    }

    /// The slots of the Maglev table of a service with `active` active backends.
    pub fn size_for(&self, active: usize) -> u32 {
        common::table_size(self.class_for(active), self.size)
    }

    /// The slots of the table a service's entry names (`Service::table`; 0 for an unknown
    /// class).
    pub fn size_of(&self, table: u32) -> u32 {
        common::table_size(common::ref_class(table), self.size)
    }

    /// Bytes of kernel memory one service's Maglev table takes at most: `size` slots of 4 bytes, in
    /// elements of 16 slots (a service with fewer than `size / 100` active backends takes
    /// less: `size_for`). Only services with backends have one.
    pub fn table_bytes(&self) -> u64 {
        common::ring_stride(self.size) as u64 * std::mem::size_of::<common::RingChunk>() as u64
    }

    /// `table_bytes` for every service the maps have room for: the tables' memory when all
    /// are in use.
    pub fn full_tables_bytes(&self) -> u64 {
        self.services as u64 * self.table_bytes()
    }

    /// The same with flow tables of `flows` entries (1024 to 16 Mi).
    pub fn with_flows(self, flows: u32) -> std::result::Result<TableConfig, String> {
        if !(common::MIN_FLOW_TABLE..=common::MAX_FLOW_TABLE).contains(&flows) {
            return Err(format!(
                "the flow table size must be from {} to {} (not {flows})",
                common::MIN_FLOW_TABLE,
                common::MAX_FLOW_TABLE
            ));
        }
        Ok(TableConfig { flows, ..self })
    }
}

impl std::fmt::Display for TableConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Maglev tables of {} slots (seed {:#x}, {} KiB each), flow tables of {}, room for {} services, {} backends and {} memberships",
            self.size,
            self.seed,
            self.table_bytes() / 1024,
            self.flows,
            self.services,
            self.backends,
            self.members
        )
    }
}

/// Services, distinct backends and memberships in use: compare with the `TableConfig`'s.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Services (both families).
    pub services: u32,
    /// Distinct backends (both families).
    pub backends: u32,
    /// (service, backend) memberships.
    pub members: u32,
}

impl Usage {
    /// Each resource as (name, in use, room, the flag that sets the room).
    pub fn against(&self, room: &TableConfig) -> [(&'static str, u32, u32, &'static str); 3] {
        [
            ("services", self.services, room.services, "--max-services"),
            ("backends", self.backends, room.backends, "--max-backends"),
            ("memberships", self.members, room.members, "--max-members"),
        ]
    }

    /// The resources at least `percent`% used.
    pub fn above(
        &self,
        room: &TableConfig,
        percent: u64,
    ) -> Vec<(&'static str, u32, u32, &'static str)> {
        self.against(room)
            .into_iter()
            .filter(|(_, used, cap, _)| *used as u64 * 100 >= *cap as u64 * percent)
            .collect()
    }
}
