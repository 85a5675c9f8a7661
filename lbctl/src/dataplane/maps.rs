//! The pinned maps as user space reads and writes them (`Maps`), and what they hold as the
//! control plane sees it (`KernelState`).
use super::{
    counters::Counters,
    flow_tables::FlowTable,
    load::table_of,
    sizing::{TableConfig, Usage},
    spec::{self, open_map},
    sys::Family,
};
use crate::{
    error::{Error, Result},
    model::{BackendState, Proto, Vip},
};
use aya::maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray};
use lb_common::{
    self as common, BACKEND_LIVE, Backend, Backend6, Flow, FlowEntry, MEMBER_DRAINING, Member,
    MemberKey, Service, Stat, Traffic, VipKey, VipKey6,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

/// The maps the agent writes and `lbctl` reads, opened from their pins.
pub struct Maps {
    pub(super) services: HashMap<MapData, VipKey, Service>,
    pub(super) backends: Array<MapData, Backend>,
    pub(super) tables: super::tables::Tables,
    pub(super) members: HashMap<MapData, MemberKey, Member>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) flows: Option<FlowTable<Flow>>,
    pub(super) service_traffic: Counters<Traffic>,
    pub(super) backend_traffic: Counters<Traffic>,
    pub(super) services6: HashMap<MapData, VipKey6, Service>,
    pub(super) backends6: Array<MapData, Backend6>,
    pub(super) flows6: Option<FlowTable<lb_common::Flow6>>,
    pub(super) lost: PerCpuArray<MapData, u64>,
    /// `lb_ftpres_v1`; None for a data plane loaded from an object without it.
    pub(super) pressure: Option<PerCpuArray<MapData, u64>>,
    pub(super) sock_stats: PerCpuArray<MapData, u64>,
    pub(super) sock_service: Counters<u64>,
    pub(super) sock_backend: Counters<u64>,
    pub(super) config: Array<MapData, u32>,
    pub(super) reply_ports: Option<ReplyPorts>,
    pub(super) vip_filter: Option<VipFilter>,
    pub(super) departures: Option<Array<MapData, u32>>,
}

/// Map `name` pinned in `dir` opened with `open`; None when it is not pinned.
fn optional<T>(dir: &Path, name: &str, open: fn(&Path, &str) -> Result<T>) -> Result<Option<T>> {
    match dir.join(name).exists() {
        true => open(dir, name).map(Some),
        false => Ok(None),
    }
}

impl Maps {
    /// Opens the maps pinned in `dir`, after checking that every map of the spec table is.
    pub fn open(dir: &Path) -> Result<Maps> {
        match std::fs::metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::NotPermitted(dir.to_path_buf()));
            }
            Err(_) => return Err(Error::NotRunning(dir.to_path_buf())),
        }
        const OPTIONAL: [&str; 13] = [
            common::MAP_FLOWS,
            common::MAP_FLOW_PRESSURE,
            common::MAP_FLOWS6,
            common::MAP_FLOW_SEED,
            common::MAP_REPLY_PORTS,
            common::MAP_VIP_FILTER,
            common::MAP_DEPARTURES,
            common::MAP_BACKEND_VIPS,
            common::MAP_BACKEND_VIPS6,
            common::MAP_V6_XDP,
            common::MAP_V6_TC,
            common::MAP_PMTU_XDP,
            common::MAP_PMTU_TC,
        ];
        // The flow tables and their counters, lb_rport_v1, lb_vipf_v1, lb_svcdep_v1,
        // lb_bevip_v1 and the program arrays are optional here: a data plane loaded from an older object (the bench's
        // baseline; an agent of an earlier version) may lack them, and nothing reads them but
        // the programs built with them. The agent's own loads always create them.
        let missing: Vec<&str> = spec::MAPS
            .iter()
            .map(|m| m.name)
            .filter(|n| !dir.join(n).exists() && !OPTIONAL.contains(n))
            .collect();
        if missing.len() == spec::MAPS.len() {
            return Err(Error::NotRunning(dir.to_path_buf()));
        }
        if !missing.is_empty() {
            return Err(Error::io(
                format!(
                    "the data plane at {} is incomplete (run `lbctl down --pin-dir {0}` and start the agent again)",
                    dir.display()
                ),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} not pinned", missing.join(", ")),
                ),
            ));
        }
        Ok(Maps {
            services: open_map(dir, common::MAP_SERVICES)?,
            backends: open_map(dir, common::MAP_BACKENDS)?,
            tables: super::tables::Tables::open(
                dir,
                table_of(&open_map(dir, common::MAP_CONFIG)?)?.size,
            )?,
            members: open_map(dir, common::MAP_MEMBERS)?,
            stats: open_map(dir, common::MAP_STATS)?,
            flows: optional(dir, common::MAP_FLOWS, FlowTable::open)?,
            service_traffic: Counters::open(dir, common::MAP_SERVICE_TRAFFIC)?,
            backend_traffic: Counters::open(dir, common::MAP_BACKEND_TRAFFIC)?,
            services6: open_map(dir, common::MAP_SERVICES6)?,
            backends6: open_map(dir, common::MAP_BACKENDS6)?,
            flows6: optional(dir, common::MAP_FLOWS6, FlowTable::open)?,
            lost: open_map(dir, common::MAP_FLOWS_LOST)?,
            pressure: optional(dir, common::MAP_FLOW_PRESSURE, open_map)?,
            sock_stats: open_map(dir, common::MAP_SOCK_STATS)?,
            sock_service: Counters::open(dir, common::MAP_SOCK_SERVICE)?,
            sock_backend: Counters::open(dir, common::MAP_SOCK_BACKEND)?,
            config: open_map(dir, common::MAP_CONFIG)?,
            reply_ports: match dir.join(common::MAP_REPLY_PORTS).exists() {
                true => Some(ReplyPorts::open(dir)?),
                false => None,
            },
            vip_filter: match dir.join(common::MAP_VIP_FILTER).exists() {
                true => Some(VipFilter::open(dir)?),
                false => None,
            },
            departures: match dir.join(common::MAP_DEPARTURES).exists() {
                true => Some(open_map(dir, common::MAP_DEPARTURES)?),
                false => None,
            },
        })
    }

    /// The counters of `lb_stats_v3`, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        Stat::ALL
            .iter()
            .map(|s| Ok((*s, self.counter(&s.counter())?)))
            .collect()
    }

    /// Every counter of `lb_common::COUNTERS`, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(common::Counter, u64)>> {
        common::COUNTERS
            .iter()
            .map(|c| Ok((*c, self.counter(c)?)))
            .collect()
    }

    /// One counter, read from the map its descriptor names and summed over CPUs: the one place
    /// that reads the counter maps. A counter of a map the data plane lacks (loaded from an
    /// older object, which does not count it) reads 0.
    fn counter(&self, c: &common::Counter) -> Result<u64> {
        let map = match c.map {
            common::MAP_STATS => &self.stats,
            common::MAP_FLOWS_LOST => &self.lost,
            common::MAP_FLOW_PRESSURE => match &self.pressure {
                Some(m) => m,
                None => return Ok(0),
            },
            common::MAP_SOCK_STATS => &self.sock_stats,
            other => {
                return Err(Error::Config(format!(
                    "counter {} names {other}, which is not a counter map",
                    c.name
                )));
            }
        };
        let v = map
            .get(&c.index, 0)
            .map_err(|e| Error::map(format!("reading {} of {}", c.name, c.map), e))?;
        Ok(v.iter().sum())
    }

    /// The Maglev table size and seed this data plane was loaded with.
    pub fn table(&self) -> Result<TableConfig> {
        table_of(&self.config)
    }

    /// Packets of established TCP flows that found no flow entry (evicted while alive, or older
    /// than this data plane), summed over CPUs.
    pub fn flows_lost(&self) -> Result<u64> {
        self.counter(&common::FLOWS_LOST)
    }

    /// What the flow tables did for new flows whose buckets held only flows in use, summed
    /// over CPUs: `[moved, evicted]` (`lb_ftpres_v1`, `lb_common::FLOW_PRESSURE`).
    pub fn flow_pressure(&self) -> Result<[u64; 2]> {
        Ok([
            self.counter(&common::FLOW_PRESSURE[0])?,
            self.counter(&common::FLOW_PRESSURE[1])?,
        ])
    }

    /// What the kernel serves now.
    pub fn read(&self) -> Result<KernelState> {
        let mut state = KernelState::default();
        let mut by_id: BTreeMap<u32, Vip> = BTreeMap::new();
        let mut found: Vec<(Vip, Service)> = Vec::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(|e| Error::map("reading lb_svc_v1", e))?;
            if let Some(vip) = Key::V4(k).vip() {
                found.push((vip, v));
            }
        }
        for item in self.services6.iter() {
            let (k, v) = item.map_err(|e| Error::map("reading lb_svc6_v1", e))?;
            if let Some(vip) = Key::V6(k).vip() {
                found.push((vip, v));
            }
        }
        for (vip, v) in found {
            by_id.insert(v.id, vip);
            state.services.insert(
                vip,
                KernelService {
                    id: v.id,
                    table: v.table,
                    active: v.active,
                    backends: BTreeMap::new(),
                    departures: v.departures,
                },
            );
        }
        for item in self.members.iter() {
            let (k, m) = item.map_err(|e| Error::map("reading lb_member_v1", e))?;
            let Some(vip) = by_id.get(&k.service) else {
                continue;
            };
            let Some(addr) = self.backend_at(k.backend, vip.addr.is_ipv6())? else {
                continue;
            };
            state.backend_ids.insert(addr, k.backend);
            let st = if m.state == MEMBER_DRAINING {
                BackendState::Draining
            } else {
                BackendState::Active
            };
            if let Some(svc) = state.services.get_mut(vip) {
                svc.backends.insert(addr, (k.backend, st));
            }
        }
        Ok(state)
    }

    /// The live backend in slot `id` of the IPv4 or IPv6 backend array.
    pub(super) fn backend_at(&self, id: u32, v6: bool) -> Result<Option<SocketAddr>> {
        if v6 {
            let be = self
                .backends6
                .get(&id, 0)
                .map_err(|e| Error::map("reading lb_be6_v1", e))?;
            Ok((be.flags & BACKEND_LIVE != 0).then(|| {
                SocketAddr::V6(SocketAddrV6::new(
                    addr6(be.addr),
                    u16::from_be(be.port),
                    0,
                    0,
                ))
            }))
        } else {
            let be = self
                .backends
                .get(&id, 0)
                .map_err(|e| Error::map("reading lb_be_v1", e))?;
            Ok((be.flags & BACKEND_LIVE != 0).then(|| backend_addr(&be)))
        }
    }

    pub(super) fn service(&self, key: &Key) -> Result<Option<Service>> {
        let got = match key {
            Key::V4(k) => self.services.get(k, 0),
            Key::V6(k) => self.services6.get(k, 0),
        };
        match got {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::map("reading the services", e)),
        }
    }

    /// Every tracked flow of both families as (client, VIP, protocol, entry).
    pub(super) fn flow_entries(
        &self,
    ) -> Result<impl Iterator<Item = (SocketAddr, SocketAddr, Proto, FlowEntry)> + '_> {
        let v4 = self.flows.as_ref().map(|t| t.entries()).transpose()?;
        let v6 = self.flows6.as_ref().map(|t| t.entries()).transpose()?;
        let v4 = v4.into_iter().flatten().filter_map(|(k, e)| {
            let ip = |a: u32, p: u16| {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(a))), u16::from_be(p))
            };
            Some((
                ip(k.src, k.sport),
                ip(k.dst, k.dport),
                Proto::from_number(k.proto)?,
                e,
            ))
        });
        let v6 = v6.into_iter().flatten().filter_map(|(k, e)| {
            let ip = |a: [u32; 4], p: u16| SocketAddr::new(IpAddr::V6(addr6(a)), u16::from_be(p));
            Some((
                ip(k.src, k.sport),
                ip(k.dst, k.dport),
                Proto::from_number(k.proto)?,
                e,
            ))
        });
        Ok(v4.chain(v6))
    }

    /// Backend slots that are live but serve no service (left by an agent that stopped midway).
    pub(super) fn orphan_backends(&self, state: &KernelState, backends: u32) -> Result<Vec<u32>> {
        let used: BTreeSet<u32> = state.backend_ids.values().copied().collect();
        // Both arrays whole, a batch of slots a system call (one lookup a slot took 8,192
        // system calls at the default size).
        let read = |what: &str, e| Error::io(format!("reading {what}"), e);
        let v4: Vec<Backend> = super::sys::array_read_batch(
            aya::maps::IterableMap::map(&self.backends),
            backends.min(self.backends.len()),
        )
        .map_err(|e| read("lb_be_v1", e))?;
        let v6: Vec<Backend6> = super::sys::array_read_batch(
            aya::maps::IterableMap::map(&self.backends6),
            backends.min(self.backends6.len()),
        )
        .map_err(|e| read("lb_be6_v1", e))?;
        let live = |id: usize| {
            v4.get(id).is_some_and(|b| b.flags & BACKEND_LIVE != 0)
                || v6.get(id).is_some_and(|b| b.flags & BACKEND_LIVE != 0)
        };
        Ok((0..backends)
            .filter(|id| live(*id as usize) && !used.contains(id))
            .collect())
    }

    /// Chunks of Maglev tables the kernel holds (`lb_common::TABLES_PER_CHUNK` tables each).
    pub fn table_chunks(&self) -> Result<usize> {
        Ok(self.tables.present()?.len())
    }

    /// Chunks of Maglev tables the kernel holds, and the bytes they take (chunks of each size
    /// class differ).
    pub fn table_memory(&self) -> Result<(usize, u64)> {
        self.tables.memory()
    }

    /// The backend a new flow from `src` to `vip` would get, with the kernel's own hash and table.
    pub fn pick(&self, vip: &Vip, src: impl Into<SocketAddr>) -> Result<Option<SocketAddr>> {
        self.pick_after(vip, src, 0)
    }

    /// The backend in the slot `step` after the one a new flow from `src` to `vip` gets: where
    /// the kernel looks when that flow's backend is taken (a port clash).
    pub fn pick_after(
        &self,
        vip: &Vip,
        src: impl Into<SocketAddr>,
        step: u32,
    ) -> Result<Option<SocketAddr>> {
        let key = Key::of(vip);
        let Some(h) = key.hash(src.into()) else {
            return Ok(None);
        };
        self.pick_slot(vip, h.wrapping_add(step))
    }

    /// The backend in slot `h % size` of the live table of `vip`, `size` its table's (None: not
    /// served, or no active backend).
    pub fn pick_slot(&self, vip: &Vip, h: u32) -> Result<Option<SocketAddr>> {
        let key = Key::of(vip);
        let Some(svc) = self.service(&key)? else {
            return Ok(None);
        };
        if svc.active == 0 {
            return Ok(None);
        }
        let Some(slots) = self.tables.read(svc.table)? else {
            return Ok(None);
        };
        if slots.is_empty() {
            return Ok(None);
        }
        match slots.get(h as usize % slots.len()) {
            Some(id) => self.backend_at(*id, vip.addr.is_ipv6()),
            None => Ok(None),
        }
    }
}

/// A VIP as the kernel keys it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Key {
    V4(VipKey),
    V6(VipKey6),
}

impl Key {
    pub(super) fn of(vip: &Vip) -> Key {
        let (port, proto) = (vip.addr.port().to_be(), vip.proto.number());
        match vip.addr.ip() {
            IpAddr::V4(a) => Key::V4(VipKey {
                addr: u32::from(a).to_be(),
                port,
                proto,
                _pad: 0,
            }),
            IpAddr::V6(a) => Key::V6(VipKey6 {
                addr: words6(a),
                port,
                proto,
                _pad: 0,
            }),
        }
    }

    /// The word of a `lb_vipf_v1` of `words` words and the bit there that this VIP's address
    /// and port take.
    pub(super) fn filter_bit(&self, words: u32) -> (u32, u64) {
        match self {
            Key::V4(k) => common::vip_filter_bit(k.addr, k.port, words),
            Key::V6(k) => common::vip_filter_bit(common::fold6(k.addr), k.port, words),
        }
    }

    pub(super) fn vip(&self) -> Option<Vip> {
        let (addr, port, proto) = match self {
            Key::V4(k) => (
                IpAddr::V4(Ipv4Addr::from(u32::from_be(k.addr))),
                k.port,
                k.proto,
            ),
            Key::V6(k) => (IpAddr::V6(addr6(k.addr)), k.port, k.proto),
        };
        Some(Vip {
            addr: SocketAddr::new(addr, u16::from_be(port)),
            proto: Proto::from_number(proto)?,
        })
    }

    /// The kernel's flow hash of a new flow from `src` (None when the families differ).
    pub(super) fn hash(&self, src: SocketAddr) -> Option<u32> {
        let sport = src.port().to_be();
        match (self, src.ip()) {
            (Key::V4(k), IpAddr::V4(s)) => Some(common::flow_hash(
                u32::from(s).to_be(),
                k.addr,
                sport,
                k.port,
                k.proto,
            )),
            (Key::V6(k), IpAddr::V6(s)) => Some(common::flow_hash6(
                &words6(s),
                &k.addr,
                sport,
                k.port,
                k.proto,
            )),
            _ => None,
        }
    }
}

/// An IPv6 address as the four BE words the packet (and the maps) hold.
pub(super) fn words6(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub(super) fn addr6(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

pub(super) fn backend_addr(be: &Backend) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(be.addr)),
        u16::from_be(be.port),
    ))
}

/// One service as the maps hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelService {
    /// The service's id: its memberships and counters.
    pub id: u32,
    /// The class and block of `lb_tables_v2` its live table is in (`lb_common::table_ref`;
    /// `lb_common::NO_TABLE`: none).
    pub table: u32,
    /// Backends that take new flows (0 also while a service whose entry is gone still has
    /// memberships to remove).
    pub active: u32,
    /// Backend address -> (backend id, state).
    pub backends: BTreeMap<SocketAddr, (u32, BackendState)>,
    /// How many times backends left it (`Service::departures`).
    pub departures: u32,
}

/// The services the kernel maps hold.
#[derive(Debug, Clone, Default)]
pub struct KernelState {
    /// Every service, by VIP.
    pub services: BTreeMap<Vip, KernelService>,
    /// The backend slot of every backend in use.
    pub backend_ids: BTreeMap<SocketAddr, u32>,
}

impl KernelState {
    /// Services with a Maglev table: those with active backends.
    pub fn tables(&self) -> usize {
        self.services.values().filter(|s| s.active > 0).count()
    }

    /// How much of the data plane's room this state takes.
    pub fn usage(&self) -> Usage {
        Usage {
            services: self.services.len() as u32,
            backends: self.backend_ids.len() as u32,
            members: self
                .services
                .values()
                .map(|s| s.backends.len() as u32)
                .sum(),
        }
    }
}

/// Backend slot `id` holding `addr`, live, in the array of its family.
fn live_slot(id: u32, addr: SocketAddr) -> Family<u32, Backend, u32, Backend6> {
    match addr {
        SocketAddr::V4(a) => Family::V4(
            id,
            Backend {
                addr: u32::from(*a.ip()).to_be(),
                port: a.port().to_be(),
                flags: BACKEND_LIVE,
                _pad: 0,
            },
        ),
        SocketAddr::V6(a) => Family::V6(
            id,
            Backend6 {
                addr: words6(*a.ip()),
                port: a.port().to_be(),
                flags: BACKEND_LIVE,
                _pad: 0,
            },
        ),
    }
}

impl Maps {
    /// Writes backend slot `id` (in the array of the address's family), or clears it in both.
    pub(super) fn set_backend(&mut self, id: u32, addr: Option<SocketAddr>) -> Result<()> {
        // The port's bit first: the backend's replies must never be taken for strangers.
        if let (Some(a), Some(ports)) = (addr, self.reply_ports.as_mut()) {
            ports.mark(a.port())?;
        }
        let (v4, v6) = match addr.map(|a| live_slot(id, a)) {
            Some(Family::V4(_, be)) => (Some(be), None),
            Some(Family::V6(_, be)) => (None, Some(be)),
            None => (Some(Backend::default()), Some(Backend6::default())),
        };
        if let Some(be) = v4 {
            self.backends
                .set(id, be, 0)
                .map_err(|e| Error::map("writing lb_be_v1", e))?;
        }
        if let Some(be) = v6 {
            self.backends6
                .set(id, be, 0)
                .map_err(|e| Error::map("writing lb_be6_v1", e))?;
        }
        Ok(())
    }

    /// Writes backend slots, as `set_backend` one after the other: every port's bit first, then
    /// each run of one family's slots in one write. Says how many were written before one
    /// failed.
    pub(super) fn set_backends(&mut self, backends: &[(u32, SocketAddr)]) -> (usize, Result<()>) {
        let mut marked = backends.len();
        let mut result = Ok(());
        if let Some(ports) = self.reply_ports.as_mut() {
            for (i, (_, addr)) in backends.iter().enumerate() {
                if let Err(e) = ports.mark(addr.port()) {
                    (marked, result) = (i, Err(e));
                    break;
                }
            }
        }
        let slots: Vec<Family<u32, Backend, u32, Backend6>> = backends[..marked]
            .iter()
            .map(|(id, addr)| live_slot(*id, *addr))
            .collect();
        match super::sys::update_by_family(
            IterableMap::map(&self.backends),
            IterableMap::map(&self.backends6),
            &slots,
        ) {
            Ok(()) => (marked, result),
            Err((n, e)) => (n, Err(Error::io("writing the backends' slots", e))),
        }
    }

    /// Zeroes a service's or backend's counters when its slot is given out.
    pub(super) fn reset_traffic(&mut self, service: bool, id: u32) -> Result<()> {
        if service {
            self.service_traffic.reset(id)?;
            self.sock_service.reset(id)
        } else {
            self.backend_traffic.reset(id)?;
            self.sock_backend.reset(id)
        }
    }
}

/// `lb_rport_v1` with the ports this process knows are marked, so that writing a backend whose
/// port is marked costs no syscall (only the agent sets bits, and none is ever cleared).
pub(super) struct ReplyPorts {
    map: Array<MapData, u64>,
    marked: BTreeSet<u16>,
}

impl ReplyPorts {
    fn open(dir: &Path) -> Result<ReplyPorts> {
        Ok(ReplyPorts {
            map: open_map(dir, common::MAP_REPLY_PORTS)?,
            marked: BTreeSet::new(),
        })
    }

    /// Sets `port`'s bit, unless this process did already.
    fn mark(&mut self, port: u16) -> Result<()> {
        if !self.marked.contains(&port) {
            mark_reply_port(&mut self.map, port)?;
            self.marked.insert(port);
        }
        Ok(())
    }
}

/// Sets `port`'s bit in `lb_rport_v1` (`common::reply_port_bit`) if it is not set yet.
fn mark_reply_port(ports: &mut Array<MapData, u64>, port: u16) -> Result<()> {
    let (word, bit) = common::reply_port_bit(port);
    update_bits(ports, common::MAP_REPLY_PORTS, word, bit, true).map(|_| ())
}

/// Sets or clears the bits `mask` in word `word` of the bitmap `name` (an array of `u64`, which
/// only this process writes), with no write when they are so already. Returns the bits changed.
fn update_bits(
    map: &mut Array<MapData, u64>,
    name: &str,
    word: u32,
    mask: u64,
    set: bool,
) -> Result<u64> {
    let had = map
        .get(&word, 0)
        .map_err(|e| Error::map(format!("reading {name}"), e))?;
    let want = if set { had | mask } else { had & !mask };
    if want != had {
        map.set(word, want, 0)
            .map_err(|e| Error::map(format!("writing {name}"), e))?;
    }
    Ok(want ^ had)
}

/// `lb_vipf_v1` and the services whose bits the writer counts there (`common::vip_filter_bit`):
/// a VIP's bit is set before its service is written and cleared once the last service on that
/// bit is removed, so that the program never misses a service and a bit left set costs a packet
/// not for a VIP only the hash lookup it would make without the filter.
pub(super) struct VipFilter {
    map: Array<MapData, u64>,
    /// How many words the map is used with (`common::vip_filter_words_in`), as the programs.
    size: u32,
    /// The services counted, by VIP, with the bit (word, mask) each is on.
    vips: BTreeMap<Vip, (u32, u64)>,
    /// How many counted services are on each bit.
    bits: BTreeMap<(u32, u64), u32>,
    /// Bits this writer set ahead of their services (`mark_ahead`) and no service counts yet.
    ahead: BTreeSet<(u32, u64)>,
}

impl VipFilter {
    fn open(dir: &Path) -> Result<VipFilter> {
        let map: Array<MapData, u64> = open_map(dir, common::MAP_VIP_FILTER)?;
        Ok(VipFilter {
            size: common::vip_filter_words_in(map.len()),
            map,
            vips: BTreeMap::new(),
            bits: BTreeMap::new(),
            ahead: BTreeSet::new(),
        })
    }

    /// Sets the bits of the services of `vips` not counted yet, with one read of the filter and
    /// one write of the words that change, before those services are written (a first apply of
    /// 10,000 services made 20,000 system calls here). `add` then finds their bits set; those no
    /// service came to count are cleared by `drop_ahead` once the services are written.
    pub(super) fn mark_ahead<'a>(&mut self, vips: impl Iterator<Item = &'a Vip>) -> Result<()> {
        let mut masks: BTreeMap<u32, u64> = BTreeMap::new();
        let mut bits = Vec::new();
        for vip in vips.filter(|v| !self.vips.contains_key(v)) {
            let bit = Key::of(vip).filter_bit(self.size);
            if self.bits.get(&bit).copied().unwrap_or(0) == 0 && !self.ahead.contains(&bit) {
                *masks.entry(bit.0).or_default() |= bit.1;
                bits.push(bit);
            }
        }
        if masks.is_empty() {
            return Ok(());
        }
        let words = self.words()?;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (word, mask) in masks {
            let had = words.get(word as usize).copied().unwrap_or(0);
            if had | mask != had {
                keys.push(word);
                values.push(had | mask);
            }
        }
        let data = aya::maps::IterableMap::<u32, u64>::map(&self.map);
        super::sys::map_update_batch(data, &keys, &values)
            .map_err(|(_, e)| Error::io(format!("writing {}", common::MAP_VIP_FILTER), e))?;
        self.ahead.extend(bits);
        Ok(())
    }

    /// Every word of the map (in batches: a scrape reads them all).
    fn words(&self) -> Result<Vec<u64>> {
        let data = aya::maps::IterableMap::<u32, u64>::map(&self.map);
        super::sys::array_read_batch(data, self.size)
            .map_err(|e| Error::io(format!("reading {}", common::MAP_VIP_FILTER), e))
    }

    /// Word `i` of the map.
    fn word(&self, i: u32) -> Result<u64> {
        self.map
            .get(&i, 0)
            .map_err(|e| Error::map(format!("reading {}", common::MAP_VIP_FILTER), e))
    }

    /// Counts the services already in the maps, whose bits the loader set (`mark_vips`).
    pub(super) fn adopt<'a>(&mut self, vips: impl Iterator<Item = &'a Vip>) {
        for vip in vips {
            let bit = Key::of(vip).filter_bit(self.size);
            if self.vips.insert(*vip, bit).is_none() {
                *self.bits.entry(bit).or_insert(0) += 1;
            }
        }
    }

    /// Before the service of `vip` is written: counts it, and sets its bit if it is the first.
    /// Returns whether it was not counted yet (a new service).
    pub(super) fn add(&mut self, vip: &Vip) -> Result<bool> {
        if self.vips.contains_key(vip) {
            return Ok(false);
        }
        let bit = Key::of(vip).filter_bit(self.size);
        let n = self.bits.get(&bit).copied().unwrap_or(0);
        if n == 0 && !self.ahead.remove(&bit) {
            update_bits(&mut self.map, common::MAP_VIP_FILTER, bit.0, bit.1, true)?;
        }
        self.bits.insert(bit, n + 1);
        self.vips.insert(*vip, bit);
        Ok(true)
    }

    /// Clears the bits `mark_ahead` set that no service counts: the services they were set for
    /// were not written (refused, or failed). One that cannot be cleared stays set, which only
    /// costs a packet to it the service lookup.
    pub(super) fn drop_ahead(&mut self) {
        for bit in std::mem::take(&mut self.ahead) {
            if self.bits.get(&bit).copied().unwrap_or(0) > 0 {
                continue;
            }
            if let Err(e) = update_bits(&mut self.map, common::MAP_VIP_FILTER, bit.0, bit.1, false)
            {
                tracing::warn!(error = %e, "VIP filter: a bit set for a service not written is left set");
            }
        }
    }

    /// After the service of `vip` was removed: uncounts it, and clears its bit if it was the
    /// last there (after a failure the bit stays set, which is safe).
    pub(super) fn remove(&mut self, vip: &Vip) -> Result<()> {
        let Some(bit) = self.vips.remove(vip) else {
            return Ok(());
        };
        match self.bits.get(&bit).copied().unwrap_or(1) {
            n if n > 1 => {
                self.bits.insert(bit, n - 1);
                Ok(())
            }
            _ => {
                self.bits.remove(&bit);
                update_bits(&mut self.map, common::MAP_VIP_FILTER, bit.0, bit.1, false).map(|_| ())
            }
        }
    }
}

/// Every service in `lb_svc_v1` and `lb_svc6_v1`, with its key.
fn services_of(
    services: &HashMap<MapData, VipKey, Service>,
    services6: &HashMap<MapData, VipKey6, Service>,
) -> Result<Vec<(Key, Service)>> {
    let v4 = services.iter().map(|r| r.map(|(k, s)| (Key::V4(k), s)));
    v4.chain(services6.iter().map(|r| r.map(|(k, s)| (Key::V6(k), s))))
        .map(|r| r.map_err(|e| Error::map("reading the services", e)))
        .collect()
}

/// Every service pinned in `dir`, with its key.
fn pinned_services(dir: &Path) -> Result<Vec<(Key, Service)>> {
    services_of(
        &open_map(dir, common::MAP_SERVICES)?,
        &open_map(dir, common::MAP_SERVICES6)?,
    )
}

/// What `lb_vipf_v1` holds against the services of the maps (`Maps::filter_check`, shown by
/// `lbctl status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FilterCheck {
    /// The filter's bits (64 a word; its words follow the room for services,
    /// `common::vip_filter_words`).
    pub bits: u64,
    /// Bits set.
    pub set: u64,
    /// Bits set that no service is on: harmless (a packet whose destination hashes there only
    /// costs the service lookup the filter would have spared), left by a clear that failed or an
    /// agent stopped between removing a service and clearing its bit.
    pub stale: u64,
    /// Services whose bit is clear: the programs pass their packets as not for a VIP. Only a
    /// writer that does not know the filter (an older agent) leaves one; the next load of the
    /// programs (an agent's start) sets every service's bit.
    pub unmarked: Vec<String>,
}

impl Maps {
    /// Reads `lb_vipf_v1` and checks it against the services; None for a data plane without it.
    /// The agent may write while this reads: a service is reported unmarked only if its bit was
    /// clear, the service was there after that, and its bit is still clear after that (the
    /// writer sets a bit before it writes the service), so a service added or removed meanwhile
    /// is not; `stale` may count the bit of a service added or removed meanwhile.
    pub fn filter_check(&self) -> Result<Option<FilterCheck>> {
        let Some(filter) = &self.vip_filter else {
            return Ok(None);
        };
        let words = filter.words()?;
        let is_set =
            |(word, mask): (u32, u64)| words.get(word as usize).is_some_and(|v| v & mask != 0);
        let services = services_of(&self.services, &self.services6)?;
        let mut needed = BTreeSet::new();
        let mut unmarked = Vec::new();
        for (key, _) in services {
            let bit = key.filter_bit(filter.size);
            needed.insert(bit);
            if is_set(bit) || !self.holds(&key)? {
                continue;
            }
            if filter.word(bit.0)? & bit.1 == 0 {
                unmarked.push(match key.vip() {
                    Some(vip) => vip.to_string(),
                    None => format!("{key:?}"),
                });
            }
        }
        let set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let needed_set = needed.iter().filter(|b| is_set(**b)).count() as u64;
        Ok(Some(FilterCheck {
            bits: u64::from(filter.size) * 64,
            set,
            stale: set - needed_set,
            unmarked,
        }))
    }

    /// Whether the service of `key` is in the maps now.
    fn holds(&self, key: &Key) -> Result<bool> {
        let found = match key {
            Key::V4(k) => self.services.get(k, 0).map(|_| ()),
            Key::V6(k) => self.services6.get(k, 0).map(|_| ()),
        };
        match found {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(Error::map("reading a service", e)),
        }
    }
}

/// Sets the bits of every service pinned in `dir` in its `lb_vipf_v1`: called by the loader
/// before any program that reads the filter runs, so that a data plane from an agent without the
/// map, or one that an older agent wrote to since, misses no service. Returns how many bits it
/// set.
pub(super) fn mark_vips(dir: &Path) -> Result<usize> {
    let mut map: Array<MapData, u64> = open_map(dir, common::MAP_VIP_FILTER)?;
    let size = common::vip_filter_words_in(map.len());
    let mut words: BTreeMap<u32, u64> = BTreeMap::new();
    for (key, _) in pinned_services(dir)? {
        let (word, mask) = key.filter_bit(size);
        *words.entry(word).or_insert(0) |= mask;
    }
    let mut set = 0;
    for (word, mask) in words {
        set +=
            update_bits(&mut map, common::MAP_VIP_FILTER, word, mask, true)?.count_ones() as usize;
    }
    Ok(set)
}

/// Copies the departures count of every service pinned in `dir` into `lb_svcdep_v1` under its
/// id: called by the loader before any program that reads the map runs, so that a data plane
/// from an agent without the map, or one an older agent wrote to since, has the counts the
/// flows' notes were taken at. Returns how many it wrote.
pub(super) fn seed_departures(dir: &Path) -> Result<usize> {
    let mut map: Array<MapData, u32> = open_map(dir, common::MAP_DEPARTURES)?;
    let mut written = 0;
    for (_, svc) in pinned_services(dir)? {
        let had = map
            .get(&svc.id, 0)
            .map_err(|e| Error::map(format!("reading {}", common::MAP_DEPARTURES), e))?;
        if had != svc.departures {
            map.set(svc.id, svc.departures, 0)
                .map_err(|e| Error::map(format!("writing {}", common::MAP_DEPARTURES), e))?;
            written += 1;
        }
    }
    Ok(written)
}

/// Fills a new `lb_rport_v1` in `dir` with the ports of what the data plane already holds: the
/// live backends, the backends of every reverse entry and of every backend's record (flows of an
/// agent that had no such map, or of backends that left). Called by the loader when it created the map, before any
/// program that reads it is attached. Returns how many ports it marked.
pub(super) fn seed_reply_ports(dir: &Path) -> Result<usize> {
    let mut ports = BTreeSet::new();
    let backends: Array<MapData, Backend> = open_map(dir, common::MAP_BACKENDS)?;
    for be in backends.iter().flatten() {
        if be.flags & BACKEND_LIVE != 0 {
            ports.insert(u16::from_be(be.port));
        }
    }
    let backends6: Array<MapData, Backend6> = open_map(dir, common::MAP_BACKENDS6)?;
    for be in backends6.iter().flatten() {
        if be.flags & BACKEND_LIVE != 0 {
            ports.insert(u16::from_be(be.port));
        }
    }
    // Keys that leave the LRU while it is walked are skipped: their flows are gone.
    let replies: HashMap<MapData, Flow, common::ReplyEntry> = open_map(dir, common::MAP_REPLIES)?;
    ports.extend(replies.keys().flatten().map(|k| u16::from_be(k.sport)));
    let replies6: HashMap<MapData, common::Flow6, common::ReplyEntry6> =
        open_map(dir, common::MAP_REPLIES6)?;
    ports.extend(replies6.keys().flatten().map(|k| u16::from_be(k.sport)));
    // And the backends' records: a backend that left keeps its VIPs there for a while, and its
    // lean flows have no reverse entry.
    if let Some(vips) = super::backend_vips::BackendVipMaps::open(dir)? {
        ports.extend(vips.read()?.keys().map(|a| a.port()));
    }
    let mut map: Array<MapData, u64> = open_map(dir, common::MAP_REPLY_PORTS)?;
    for port in &ports {
        mark_reply_port(&mut map, *port)?;
    }
    Ok(ports.len())
}
