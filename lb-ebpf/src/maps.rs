//! The maps, pinned by name under the agent's pin directory. The sizes below are defaults: the
//! loader sets the services', backends', memberships', table and flow maps' sizes at load time
//! (`lb_cfg_v2` records them).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, Backend6, CFG_COUNT, CFG_RING_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE, Flow, Flow6, FlowEntry, FragEntry, FragKey, MAX_FLOWS,
    MAX_FRAGMENTED, Member, MemberKey, ReplyEntry, ReplyEntry6, RingChunk, STAT_COUNT, Service,
    Stat, Traffic, VipKey, VipKey6, ring_entries,
};

#[map(name = "lb_svc_v1")]
pub static SERVICES: HashMap<VipKey, Service> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_be_v1")]
pub static BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// The agent maps this array into its memory to write whole tables at once.
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map(name = "lb_ring_v2")]
pub static RING: Array<RingChunk> = Array::pinned(
    ring_entries(DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE) as u32,
    BPF_F_MMAPABLE,
);

#[map(name = "lb_cfg_v2")]
pub static CONFIG: Array<u32> = Array::pinned(CFG_COUNT, 0);

/// The table size in use (0 until the loader wrote it).
#[inline(always)]
pub fn ring_size() -> u32 {
    CONFIG.get(CFG_RING_SIZE).copied().unwrap_or(0)
}

#[map(name = "lb_member_v1")]
pub static MEMBERS: HashMap<MemberKey, Member> = HashMap::pinned(DEFAULT_MAX_MEMBERS, 0);

#[map(name = "lb_ct_v1")]
pub static FLOWS: LruHashMap<Flow, FlowEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "lb_nat_v1")]
pub static REPLIES: LruHashMap<Flow, ReplyEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "lb_stats_v3")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[map(name = "lb_svc6_v1")]
pub static SERVICES6: HashMap<VipKey6, Service> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_be6_v1")]
pub static BACKENDS6: Array<Backend6> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "lb_ct6_v1")]
pub static FLOWS6: LruHashMap<Flow6, FlowEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "lb_nat6_v1")]
pub static REPLIES6: LruHashMap<Flow6, ReplyEntry6> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "lb_svctr_v1")]
pub static SERVICE_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "lb_betr_v1")]
pub static BACKEND_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

/// Accounts a client packet of `bytes` to its service and backend.
#[inline(always)]
pub fn account(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    if let Some(t) = SERVICE_TRAFFIC.get_ptr_mut(service) {
        bump(t, bytes, new_flow);
    }
    if let Some(t) = BACKEND_TRAFFIC.get_ptr_mut(backend) {
        bump(t, bytes, new_flow);
    }
}

#[inline(always)]
fn bump(t: *mut Traffic, bytes: u64, new_flow: bool) {
    // SAFETY: a per-CPU slot from a successful lookup; XDP programs do not preempt each other on
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

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, and XDP programs do not preempt each other on one CPU.
        unsafe { *c += 1 };
    }
}
