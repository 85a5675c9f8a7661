//! The local (socket-level) path's own maps: per socket, the backend it was given for a VIP and
//! the VIP its backend's replies must show; its counters. The services, tables and backends are
//! the packet path's (`maps`).
use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use lb_common::{
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, FlowEntry, MAX_SOCKETS, ReplyEntry6,
    SOCK_STAT_COUNT, SockKey, SockStat,
};

/// (socket, VIP) -> (service, backend): a UDP socket keeps its backend while it serves.
#[map(name = "lb_sockfw_v1")]
pub static SOCK_FWD: LruHashMap<SockKey, FlowEntry> = LruHashMap::pinned(MAX_SOCKETS, 0);

/// (socket, backend) -> VIP: what `getpeername()` and `recvmsg()` show.
#[map(name = "lb_sockrv_v1")]
pub static SOCK_REV: LruHashMap<SockKey, ReplyEntry6> = LruHashMap::pinned(MAX_SOCKETS, 0);

/// The local path's counters (`SockStat`); v2: one more (`Ended`, counted by the agent).
#[map(name = "lb_sockst_v2")]
pub static SOCK_STATS: PerCpuArray<u64> = PerCpuArray::pinned(SOCK_STAT_COUNT, 0);

/// Connections by service id, in regions as `lb_svctr_v2` (`maps::counter_slots`).
#[map(name = "lb_socksv_v2")]
pub static SOCK_SERVICE: Array<u64> = Array::pinned(DEFAULT_MAX_SERVICES, 0);

/// Connections by backend id, in regions as `lb_betr_v2`.
#[map(name = "lb_sockbe_v2")]
pub static SOCK_BACKEND: Array<u64> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

#[inline(always)]
fn bump(slot: Option<*mut u64>) {
    if let Some(c) = slot {
        // SAFETY: this CPU's slot from a successful lookup. A counter, so a lost increment when
        // a preempted program shares the CPU's slot is acceptable.
        unsafe { *c += 1 };
    }
}

/// Counts one outcome of the local path.
#[inline(always)]
pub fn sock_count(stat: SockStat) {
    bump(SOCK_STATS.get_ptr_mut(stat as u32));
}

/// Counts a connection (TCP connect, UDP socket given a backend) to a service's backend.
#[inline(always)]
pub fn sock_account(service: u32, backend: u32) {
    if let Some((s, b)) = crate::maps::counter_slots(service, backend) {
        bump(SOCK_SERVICE.get_ptr_mut(s));
        bump(SOCK_BACKEND.get_ptr_mut(b));
    }
}
