//! The maps, pinned by name under the agent's pin directory. The sizes below are defaults: the
//! loader sets the services', backends', memberships', table and flow maps' sizes at load time
//! (`lb_cfg_v2` records them).
use aya_ebpf::{
    btf_maps::ArrayOfMaps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    BPF_F_MMAPABLE, Backend, Backend6, BackendKey, BackendKey6, BackendVips, BackendVips6,
    CFG_COUNT, CFG_RING_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_MEMBERS, DEFAULT_MAX_SERVICES,
    FLOW_PRESSURE_COUNT, FLOW_TABLE_FLAGS, Flow, Flow6, FragEntry, FragKey, MAX_FLOWS,
    MAX_FRAGMENTED, MAX_RING_SIZE, Member, MemberKey, NEAR_HOP_BITS, NEAR_SINGLE_BITS,
    REPLY_PORT_WORDS, ReplyEntry, ReplyEntry6, RingChunk, STAT_COUNT, Service, Stat, TABLE_FLAGS,
    TABLES_PER_CHUNK, Traffic, VIP_FILTER_MIN_WORDS, VipKey, VipKey6, counter_slot,
    flow_table::{FlowBucket, flow_buckets},
    fold6, ring_stride, table_chunks, vip_filter_bit,
};

#[map(name = "lb_svc_v1")]
pub static SERVICES: HashMap<VipKey, Service> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_be_v1")]
pub static BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// The services' Maglev tables, in chunks of `TABLES_PER_CHUNK` tables: an array of maps
/// (BTF-defined, the only kind that can name its inner map). The template is a chunk of the
/// largest tables; the agent makes chunks of each size class in use (`TABLE_FLAGS` lets sizes
/// differ) as services need them. A service's entry names its table's class and block.
#[btf_map(name = "lb_tables_v2")]
pub static TABLES: ArrayOfMaps<
    aya_ebpf::btf_maps::Array<
        RingChunk,
        { (TABLES_PER_CHUNK * ring_stride(MAX_RING_SIZE)) as usize },
        { TABLE_FLAGS as usize },
    >,
    { table_chunks(DEFAULT_MAX_SERVICES) as usize },
> = ArrayOfMaps::new();

#[map(name = "lb_cfg_v2")]
pub static CONFIG: Array<u32> = Array::pinned(CFG_COUNT, 0);

/// The table size in use (0 until the loader wrote it).
#[inline(always)]
pub fn ring_size() -> u32 {
    CONFIG.get(CFG_RING_SIZE).copied().unwrap_or(0)
}

#[map(name = "lb_member_v1")]
pub static MEMBERS: HashMap<MemberKey, Member> = HashMap::pinned(DEFAULT_MAX_MEMBERS, 0);

#[map(name = "lb_ct_v3")]
pub static FLOWS: Array<FlowBucket<Flow>> =
    Array::pinned(flow_buckets(MAX_FLOWS), FLOW_TABLE_FLAGS);

/// The flow tables' seed (`lb_common::MAP_FLOW_SEED`): the programs take it as a constant the
/// loader sets (`flows.rs`); this map keeps it with the tables, for the next loader.
#[map(name = "lb_ctseed_v1")]
pub static FLOW_SEED: Array<u64> = Array::pinned(1, 0);

#[map(name = "lb_nat_v1")]
pub static REPLIES: LruHashMap<Flow, ReplyEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "lb_stats_v3")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[map(name = "lb_svc6_v1")]
pub static SERVICES6: HashMap<VipKey6, Service> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_be6_v1")]
pub static BACKENDS6: Array<Backend6> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "lb_ct6_v5")]
pub static FLOWS6: Array<FlowBucket<Flow6>> =
    Array::pinned(flow_buckets(MAX_FLOWS), FLOW_TABLE_FLAGS);

#[map(name = "lb_nat6_v1")]
pub static REPLIES6: LruHashMap<Flow6, ReplyEntry6> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "lb_bevip_v1")]
pub static BACKEND_VIPS: HashMap<BackendKey, BackendVips> =
    HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "lb_bevip6_v1")]
pub static BACKEND_VIPS6: HashMap<BackendKey6, BackendVips6> =
    HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "lb_rport_v1")]
pub static REPLY_PORTS: Array<u64> = Array::pinned(REPLY_PORT_WORDS, 0);

#[map(name = "lb_vipf_v1")]
pub static VIP_FILTER: Array<u64> = Array::pinned(VIP_FILTER_MIN_WORDS, 0);

/// The words of the `lb_vipf_v1` the program reads (`lb_common::GLOBAL_VIP_FILTER_WORDS`): the
/// loader sets it to the map's size, which grows with the room for services
/// (`lb_common::vip_filter_words`).
#[unsafe(no_mangle)]
static LB_VIP_FILTER_WORDS: u32 = VIP_FILTER_MIN_WORDS;

/// Whether `addr:port` (the folded address and the port, BE) may be a VIP: its bit in
/// `lb_vipf_v1` is set. Without it, no service has that address and port.
#[inline(always)]
pub fn maybe_vip(addr: u32, port: u16) -> bool {
    // SAFETY: a read of a constant the loader sets before the program is loaded (volatile: the
    // compiler must not fold the default in).
    let words = unsafe { core::ptr::read_volatile(&LB_VIP_FILTER_WORDS) };
    let (word, bit) = vip_filter_bit(addr, port, words);
    VIP_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}

/// Traffic by service id, in one region of `LB_SERVICE_IDS` slots per possible CPU (the loader
/// sizes it).
#[map(name = "lb_svctr_v2")]
pub static SERVICE_TRAFFIC: Array<Traffic> = Array::pinned(DEFAULT_MAX_SERVICES, 0);

/// Traffic by backend id, in regions of `LB_BACKEND_IDS` slots.
#[map(name = "lb_betr_v2")]
pub static BACKEND_TRAFFIC: Array<Traffic> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// The service ids a CPU's region of the counter arrays holds
/// (`lb_common::GLOBAL_SERVICE_IDS`), which the loader sets.
#[unsafe(no_mangle)]
static LB_SERVICE_IDS: u32 = DEFAULT_MAX_SERVICES;

/// The backend ids a CPU's region of the counter arrays holds (`lb_common::GLOBAL_BACKEND_IDS`).
#[unsafe(no_mangle)]
static LB_BACKEND_IDS: u32 = DEFAULT_MAX_BACKENDS;

/// This CPU's slots of service `service` and of backend `backend` in the counter arrays
/// (`lb_common::counter_slot`); None if either id lies beyond its region (the agent gives out
/// none).
#[inline(always)]
pub fn counter_slots(service: u32, backend: u32) -> Option<(u32, u32)> {
    // SAFETY: reads of constants the loader sets before the program is loaded (volatile: the
    // compiler must not fold the defaults in).
    let (services, backends) = unsafe {
        (
            core::ptr::read_volatile(&LB_SERVICE_IDS),
            core::ptr::read_volatile(&LB_BACKEND_IDS),
        )
    };
    if service >= services || backend >= backends {
        return None;
    }
    // SAFETY: a helper without arguments. The CPU cannot change while a program runs.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    Some((
        counter_slot(cpu, services, service),
        counter_slot(cpu, backends, backend),
    ))
}

/// Accounts a client packet of `bytes` to its service and backend.
#[inline(always)]
pub fn account(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    let Some((s, b)) = counter_slots(service, backend) else {
        return;
    };
    if let Some(t) = SERVICE_TRAFFIC.get_ptr_mut(s) {
        bump(t, bytes, new_flow);
    }
    if let Some(t) = BACKEND_TRAFFIC.get_ptr_mut(b) {
        bump(t, bytes, new_flow);
    }
}

#[inline(always)]
fn bump(t: *mut Traffic, bytes: u64, new_flow: bool) {
    // SAFETY: this CPU's slot from a successful lookup; XDP programs do not preempt each other on
    // one CPU.
    unsafe {
        (*t).packets += 1;
        (*t).bytes += bytes;
        (*t).new_flows += new_flow as u64;
    }
}

#[map(name = "lb_frag_v1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(MAX_FRAGMENTED, 0);

#[map(name = "lb_lost_v1")]
pub static FLOWS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Counts a packet of an established flow that found no flow entry (see lb_common).
#[inline(always)]
pub fn flow_lost() {
    if let Some(c) = FLOWS_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and XDP programs do not preempt each other on one CPU.
        unsafe { *c += 1 };
    }
}

#[map(name = "lb_ftpres_v1")]
pub static FLOW_PRESSURE: PerCpuArray<u64> = PerCpuArray::pinned(FLOW_PRESSURE_COUNT, 0);

/// Counts what a new flow's insert did to a flow in use (`lb_common::FLOW_PRESSURE_*`).
#[inline(always)]
pub fn flow_pressure(what: u32) {
    if let Some(c) = FLOW_PRESSURE.get_ptr_mut(what) {
        // SAFETY: as in `flow_lost`.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, and XDP programs do not preempt each other on one CPU.
        unsafe { *c += 1 };
    }
}

/// The next-hop cache of `fwd` (destination and ingress interface -> interface and MACs), filled
/// by the program from the FIB. Not pinned (so not in lbctl's table of pinned maps): each loaded
/// program starts with an empty cache, and an entry lives at most `NEXT_HOP_MAX_AGE_NS`.
#[map(name = "fwd_hop_v1")]
pub static NEXT_HOPS: LruHashMap<crate::fwd::NextHopKey, crate::fwd::NextHop> =
    LruHashMap::with_max_entries(lb_common::NEXT_HOP_ENTRIES, 0);

/// The first level of the next-hop cache (`lb_common::MAP_NEAR_HOPS`): for each CPU 1,024 slots
/// of its own, each a copy of a `NEXT_HOPS` entry with its key, a destination's slot picked by a
/// hash of it (`fwd::near_slot`). A hit costs no hashing by the kernel and no shared cache line;
/// a miss falls back to `NEXT_HOPS`. Not pinned, like `NEXT_HOPS`.
///
/// An array rather than a per-CPU array: a per-CPU array's lookup loads the slot's pointer
/// first, and its 56-byte values, at 8-byte alignment, mostly crossed a cache line. Here a slot
/// is 64 bytes in page-aligned values (mmapable), one line. The loader sizes it for every
/// possible CPU; with the default (one CPU's slots) the other CPUs always miss.
#[map(name = "fwd_near_v2")]
pub static NEAR_HOPS: Array<crate::fwd::NearHop> =
    Array::with_max_entries(1 << NEAR_HOP_BITS, BPF_F_MMAPABLE);

/// For each CPU 4,096 slots of its own (`lb_common::MAP_NEAR_SINGLES`, `NEAR_SINGLE_BITS`): a
/// copy of the answer of a backend's `lb_bevip_v1` record that a reply needs (its one VIP of the
/// reply's protocol and its id, or that it serves several) with the backend's address, port and
/// protocol and when it was taken (`af::NearSingle`), a backend's slot picked by a hash of them
/// (`af::near_single_slot`). A hit spares a reply the record's hash lookup; a miss (or a copy
/// older than `lb_common::RECORD_COPY_MAX_AGE_NS`) asks the record. Not pinned, like
/// `NEAR_HOPS`, and an array for the same reasons: slots of 32 bytes (IPv4) and 64 (IPv6) in
/// page-aligned values cross no cache line, and no slot's pointer is loaded first.
#[map(name = "nat_near_v2")]
pub static NEAR_SINGLES: Array<crate::af::NearSingle<u32, [u32; 0]>> =
    Array::with_max_entries(1 << NEAR_SINGLE_BITS, BPF_F_MMAPABLE);

/// The IPv6 counterpart of `NEAR_SINGLES`.
#[map(name = "nat_near6_v2")]
pub static NEAR_SINGLES6: Array<crate::af::NearSingle<[u32; 4], [u32; 2]>> =
    Array::with_max_entries(1 << NEAR_SINGLE_BITS, BPF_F_MMAPABLE);

/// `lb_xdp6`, which `lb_xdp` tail-calls for an IPv6 frame (`lb_common::MAP_V6_XDP`).
#[map(name = "lb_v6xdp_v1")]
pub static V6_XDP: ProgramArray = ProgramArray::pinned(1, 0);

/// `lb_tc6`, which `lb_tc` tail-calls for an IPv6 frame (`lb_common::MAP_V6_TC`).
#[map(name = "lb_v6tc_v1")]
pub static V6_TC: ProgramArray = ProgramArray::pinned(1, 0);

/// `lb_xdp_pmtu`, which `lb_xdp` and `lb_xdp6` tail-call for a flow's packet too big for its
/// next hop (`lb_common::MAP_PMTU_XDP`).
#[map(name = "lb_pmtuxdp_v1")]
pub static PMTU_XDP: ProgramArray = ProgramArray::pinned(1, 0);

/// `lb_tc_pmtu`, the same for `lb_tc` and `lb_tc6` (`lb_common::MAP_PMTU_TC`).
#[map(name = "lb_pmtutc_v1")]
pub static PMTU_TC: ProgramArray = ProgramArray::pinned(1, 0);

// Lookups shared by the packet path and the socket path (sock.rs): how a service, a table slot
// and a backend are found, in one place.

#[map(name = "lb_svcdep_v1")]
pub static DEPARTURES: Array<u32> = Array::pinned(DEFAULT_MAX_SERVICES, 0);

/// The departures count of the service that holds id `id` (`lb_common::MAP_DEPARTURES`).
#[inline(always)]
pub fn departures(id: u32) -> Option<u32> {
    DEPARTURES.get(id).copied()
}

/// The IPv4 service of `addr:port` (BE) for `proto`; `lb_vipf_v1` first, which spares a
/// packet not for a VIP the hash map's miss.
#[inline(always)]
pub fn service4(addr: u32, port: u16, proto: u8) -> Option<&'static Service> {
    if !maybe_vip(addr, port) {
        return None;
    }
    lookup_service4(addr, port, proto)
}

/// The IPv4 service of `addr:port` (BE) for `proto`, asked of the hash map alone (the caller
/// asked the filter).
#[inline(always)]
pub fn lookup_service4(addr: u32, port: u16, proto: u8) -> Option<&'static Service> {
    let vip = VipKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: hash map values are replaced whole by the agent, never written in place.
    unsafe { SERVICES.get(&vip) }
}

/// The IPv6 service of `addr:port` (BE) for `proto`.
#[inline(always)]
pub fn service6(addr: [u32; 4], port: u16, proto: u8) -> Option<&'static Service> {
    if !maybe_vip(fold6(addr), port) {
        return None;
    }
    lookup_service6(addr, port, proto)
}

/// The IPv6 service of `addr:port` (BE) for `proto`, asked of the hash map alone.
#[inline(always)]
pub fn lookup_service6(addr: [u32; 4], port: u16, proto: u8) -> Option<&'static Service> {
    let vip = VipKey6 {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: as in `lookup_service4`.
    unsafe { SERVICES6.get(&vip) }
}

/// A service's live table: its block and its size, which its class gives
/// (`lb_common::table_ref`).
pub struct Ring {
    block: u32,
    size: u32,
}

impl Ring {
    /// The live table of `svc`; None when the configured size is not written yet or the class
    /// is unknown.
    #[inline(always)]
    pub fn of(svc: &Service) -> Option<Ring> {
        let class = lb_common::ref_class(svc.table);
        let size = if class == 0 {
            ring_size()
        } else {
            lb_common::class_size(class)
        };
        (size != 0).then(|| Ring {
            block: lb_common::ref_block(svc.table),
            size,
        })
    }

    /// The backend id in slot `hash % size`; None when the slot is out of the map.
    #[inline(always)]
    pub fn pick(&self, hash: u32) -> Option<u32> {
        let (chunk, element, lane) =
            lb_common::table_index(self.block, hash % self.size, ring_stride(self.size));
        TABLES
            .get_value(chunk, &element)
            .and_then(|chunk| chunk.get(lane as usize))
            .copied()
    }
}

/// The backend id in slot `hash % size` of the service's live table (`Ring`).
#[inline(always)]
pub fn ring_pick(svc: &Service, hash: u32) -> Option<u32> {
    Ring::of(svc)?.pick(hash)
}

/// Whether a packet from source port `port` (BE) may be a reply: some backend uses or used it.
#[inline(always)]
pub fn maybe_reply(port: u16) -> bool {
    let (word, bit) = lb_common::reply_port_bit(u16::from_be(port));
    REPLY_PORTS.get(word).is_some_and(|w| *w & bit != 0)
}

/// A live IPv4 backend slot's address and port (BE).
#[inline(always)]
pub fn backend4(id: u32) -> Option<(u32, u16)> {
    match BACKENDS.get(id) {
        Some(be) if be.flags & lb_common::BACKEND_LIVE != 0 => Some((be.addr, be.port)),
        _ => None,
    }
}

/// A live IPv6 backend slot's address and port (BE).
#[inline(always)]
pub fn backend6(id: u32) -> Option<([u32; 4], u16)> {
    match BACKENDS6.get(id) {
        Some(be) if be.flags & lb_common::BACKEND_LIVE != 0 => Some((be.addr, be.port)),
        _ => None,
    }
}

/// The backend still serves the service (taking new flows or draining).
#[inline(always)]
pub fn is_member(service: u32, backend: u32) -> bool {
    // SAFETY: as in `service4`.
    unsafe { MEMBERS.get(&MemberKey { service, backend }) }.is_some()
}
