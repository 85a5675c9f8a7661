//! Reading the data plane for people and scrapers: `Maps::inspect` reads the kernel once per
//! request (sizes, services, counters and the flow tables walked once) into an `Inspection`
//! that `lbctl list` / `status`, the status socket and a metrics scrape all use; the tracked
//! flows; and the backend a flow would get.
use super::{
    maps::{KernelService, KernelState, Key, Maps},
    sizing::{TableConfig, Usage},
};
use crate::{
    error::Result,
    maglev,
    model::{BackendState, Proto, Vip},
};
use lb_common::{Counter, Traffic};
use serde::Serialize;
use std::{collections::BTreeMap, net::SocketAddr};

/// Everything the inspection commands and the metrics need, read from the kernel once.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The sizes the data plane was created with.
    pub table: TableConfig,
    /// The services, backends and memberships the maps hold.
    pub state: KernelState,
    /// Every counter of `lb_common::COUNTERS` (packet outcomes and lost flows), summed over CPUs.
    pub counters: Vec<(Counter, u64)>,
    /// The services with their counters and tracked flows (empty when not asked for).
    pub services: Vec<ServiceView>,
}

impl Inspection {
    /// How much of the data plane's room is in use.
    pub fn usage(&self) -> Usage {
        self.state.usage()
    }

    /// Tracked flows of every service.
    pub fn flows(&self) -> u64 {
        self.services.iter().map(|s| s.flows).sum()
    }
}

impl Maps {
    /// Reads the kernel once: sizes, services, counters, and with `services` the per-service
    /// views, for which the flow tables are walked once.
    pub fn inspect(&self, services: bool) -> Result<Inspection> {
        let state = self.read()?;
        let services = if services {
            self.views_of(&state, &self.flow_counts()?)?
        } else {
            Vec::new()
        };
        Ok(Inspection {
            table: self.table()?,
            counters: self.counters()?,
            state,
            services,
        })
    }

    /// The tracked flows (client -> VIP -> backend), at most `limit`, optionally of one VIP.
    pub fn flows(&self, vip: Option<&Vip>, limit: usize) -> Result<Vec<FlowView>> {
        let state = self.read()?;
        let by_id: BTreeMap<u32, (&Vip, &KernelService)> =
            state.services.iter().map(|(v, s)| (s.id, (v, s))).collect();
        let mut out = Vec::new();
        for (client, to, proto, e) in self.flow_entries()? {
            if vip.is_some_and(|v| v.addr != to || v.proto != proto) {
                continue;
            }
            let backend = by_id.get(&e.service()).and_then(|(_, s)| {
                s.backends
                    .iter()
                    .find(|(_, (id, _))| *id == e.backend())
                    .map(|(a, (_, st))| (a.to_string(), st.name()))
            });
            out.push(FlowView {
                protocol: proto,
                client: client.to_string(),
                vip: to.to_string(),
                backend: backend.as_ref().map(|b| b.0.clone()),
                backend_state: backend.map(|b| b.1.to_string()),
            });
            if out.len() >= limit {
                break;
            }
        }
        out.sort_by(|a, b| (&a.vip, &a.client).cmp(&(&b.vip, &b.client)));
        Ok(out)
    }
}

/// A service as `lbctl list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    /// The VIP and port.
    pub vip: String,
    /// TCP or UDP.
    pub protocol: Proto,
    /// The service's id in the maps.
    pub id: u32,
    /// Backends that take new flows.
    pub active: u32,
    /// Tracked flows now.
    pub flows: u64,
    /// What clients sent to this VIP: packets, IP bytes, new flows.
    pub packets: u64,
    /// IP bytes clients sent to this VIP.
    pub bytes: u64,
    /// New flows to this VIP.
    pub new_flows: u64,
    /// Connections (TCP connects, UDP sockets given a backend) the local path made to this VIP.
    pub local_connections: u64,
    /// Its backends.
    pub backends: Vec<BackendView>,
}

/// A backend of a service as `lbctl list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BackendView {
    /// Address and port.
    pub address: String,
    /// Active or draining.
    pub state: BackendState,
    /// Tracked flows of this service on this backend now.
    pub flows: u64,
    /// What clients sent to this backend (through any VIP): packets, IP bytes, new flows.
    pub packets: u64,
    /// IP bytes clients sent to this backend.
    pub bytes: u64,
    /// New flows given to this backend.
    pub new_flows: u64,
    /// Connections the local path gave this backend (through any VIP).
    pub local_connections: u64,
}

impl Maps {
    /// The services with their counters and, per backend, its tracked flows (the flow tables
    /// are walked once, at most `MAX_FLOWS` entries each).
    pub fn views(&self) -> Result<Vec<ServiceView>> {
        self.views_of(&self.read()?, &self.flow_counts()?)
    }

    /// Tracked flows per (service id, backend id), in one walk of both flow tables (a batch of
    /// buckets a system call); `Maps::inspect` makes it once per request.
    pub(super) fn flow_counts(&self) -> Result<BTreeMap<(u32, u32), u64>> {
        let mut flows: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (_, _, _, e) in self.flow_entries()? {
            *flows.entry((e.service(), e.backend())).or_insert(0) += 1;
        }
        Ok(flows)
    }

    /// `views` of a state already read, with flow counts already counted.
    fn views_of(
        &self,
        state: &KernelState,
        flows: &BTreeMap<(u32, u32), u64>,
    ) -> Result<Vec<ServiceView>> {
        // Each map read whole, a chunk of slots a system call, rather than id by id.
        let (service_traffic, backend_traffic) = (
            self.service_traffic.totals()?,
            self.backend_traffic.totals()?,
        );
        let (service_local, backend_local) =
            (self.sock_service.totals()?, self.sock_backend.totals()?);
        let at = |v: &[Traffic], id: u32| v.get(id as usize).copied().unwrap_or_default();
        let count = |v: &[u64], id: u32| v.get(id as usize).copied().unwrap_or_default();
        state
            .services
            .iter()
            .map(|(vip, s)| {
                let t = at(&service_traffic, s.id);
                let backends = s
                    .backends
                    .iter()
                    .map(|(a, (id, st))| {
                        let bt = at(&backend_traffic, *id);
                        Ok(BackendView {
                            address: a.to_string(),
                            state: *st,
                            flows: flows.get(&(s.id, *id)).copied().unwrap_or(0),
                            packets: bt.packets,
                            bytes: bt.bytes,
                            new_flows: bt.new_flows,
                            local_connections: count(&backend_local, *id),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(ServiceView {
                    vip: vip.addr.to_string(),
                    protocol: vip.proto,
                    id: s.id,
                    active: s.active,
                    flows: backends.iter().map(|b| b.flows).sum(),
                    packets: t.packets,
                    bytes: t.bytes,
                    new_flows: t.new_flows,
                    local_connections: count(&service_local, s.id),
                    backends,
                })
            })
            .collect()
    }
}

/// A tracked flow as `lbctl flows` shows it. `backend` is None when the flow's backend left its
/// service: the flow moves to a live backend on its next packet.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowView {
    /// TCP or UDP.
    pub protocol: Proto,
    /// The client's address and port.
    pub client: String,
    /// The VIP and port the client sent to.
    pub vip: String,
    /// The backend the flow is on, if still a member of the service.
    pub backend: Option<String>,
    /// That backend's state (active, draining).
    pub backend_state: Option<String>,
}

/// The backend a new flow from `src` would get, computed in user space from a service as derived
/// from Marathon: the same Maglev table (sorted active backends, same size and seed) and the same
/// flow hash as the kernel, so it agrees with `Maps::pick` on every agent given the same state.
pub fn predict(
    spec: &crate::model::ServiceSpec,
    src: impl Into<SocketAddr>,
    table: &TableConfig,
) -> Option<SocketAddr> {
    let h = Key::of(&spec.vip).hash(src.into())?;
    predict_slot(spec, h, table)
}

/// The backend in slot `h % size` of the Maglev table of a service as derived from Marathon,
/// `size` the one its active backends give it (`TableConfig::size_for`).
pub fn predict_slot(
    spec: &crate::model::ServiceSpec,
    h: u32,
    table: &TableConfig,
) -> Option<SocketAddr> {
    let active: Vec<SocketAddr> = spec
        .backends
        .iter()
        .filter(|(_, b)| b.state == BackendState::Active)
        .map(|(a, _)| *a)
        .collect();
    let names: Vec<String> = active.iter().map(|a| a.to_string()).collect();
    let slots = maglev::table(&names, table.size_for(names.len()), table.seed);
    if slots.is_empty() {
        return None;
    }
    Some(active[slots[h as usize % slots.len()] as usize])
}

/// Parses `ADDR:PORT` (`[v6]:PORT` for IPv6) and a protocol name, for `simulate` and `flows`.
pub fn parse_vip(addr: &str, proto: &str) -> std::result::Result<Vip, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not ADDRESS:PORT"))?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        p => return Err(format!("protocol `{p}` is not tcp or udp")),
    };
    Ok(Vip { addr, proto })
}
