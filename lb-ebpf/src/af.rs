//! What differs between IPv4 and IPv6: how a packet's addresses are read and rewritten, which
//! maps hold its services, flows and backends, and how its route is looked up. `nat` and `fwd`
//! are written once over this trait.
use crate::{
    csum,
    hook::Hook,
    maps::{
        self, BACKEND_VIPS, BACKEND_VIPS6, BACKENDS, BACKENDS6, FLOWS, FLOWS6, FRAGMENTS,
        NEAR_SINGLES, NEAR_SINGLES6, REPLIES, REPLIES6,
    },
    parse::{IP_CHECK_OFF, Ipv4Hdr, Ipv6Hdr, L4, Packet, Packet6},
};
use aya_ebpf::{bindings::bpf_fib_lookup, maps::Array};
use lb_common::{
    BACKEND_LIVE, BackendKey, BackendKey6, BackendVips, BackendVips6, Flow, Flow6, FlowEntry,
    FragEntry, FragKey, NEAR_SINGLE_BITS, RECORD_COPY_MAX_AGE_NS, ReplyEntry, ReplyEntry6, Service,
    VipKey, VipKey6, flow_hash, flow_hash6, fold6,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What forwarding needs of a packet's IP header.
pub trait Route {
    fn hop_limit(&self) -> u8;
    fn decrement_hop_limit(&self);
    /// What the next-hop cache is keyed by: the destination as 4 words (an IPv4 address in the
    /// first), and the address family.
    fn destination(&self) -> ([u32; 4], u8);
    /// Whether the FIB's answer for this packet may be cached (IPv6: not from a source the FIB
    /// never forwards from).
    fn cacheable(&self) -> bool;
    /// The IP length the FIB checks against the MTU (`Hook::fib_len`).
    fn fib_len<C: Hook>(&self) -> u16;
    fn fib_params<C: Hook>(&self, fib: &mut bpf_fib_lookup);
}

/// An IPv4 header, for routing (also the outer header of an ICMP error).
pub struct Ip4(pub *mut Ipv4Hdr);

/// An IPv6 header, for routing.
pub struct Ip6(pub *mut Ipv6Hdr);

/// A backend's entry of `lb_bevip_v1` / `lb_bevip6_v1`: its id and the VIPs it serves.
pub trait VipList<A> {
    /// The backend's id.
    fn id(&self) -> u32;
    /// Whether no lean flow can hold the backend (`lb_common::BACKEND_NO_LEAN`).
    fn no_lean(&self) -> bool;
    /// The `i`th VIP named: address, port (BE) and protocol; None past the named ones.
    fn vip(&self, i: usize) -> Option<(A, u16, u8)>;
    /// The one VIP of protocol `proto` the backend serves, if it serves exactly one.
    fn single(&self, proto: u8) -> Option<(A, u16)>;
    /// Whether the backend serves VIP `addr`:`port` (`proto`) and no other VIP of `proto`.
    fn sole(&self, addr: A, port: u16, proto: u8) -> bool;
}

impl VipList<u32> for BackendVips {
    #[inline(always)]
    fn id(&self) -> u32 {
        self.id
    }
    #[inline(always)]
    fn no_lean(&self) -> bool {
        BackendVips::no_lean(self)
    }
    #[inline(always)]
    fn vip(&self, i: usize) -> Option<(u32, u16, u8)> {
        let v = self.vips.get(i)?;
        ((i as u32) < self.served()).then_some((v.addr, v.port, v.proto))
    }
    #[inline(always)]
    fn single(&self, proto: u8) -> Option<(u32, u16)> {
        BackendVips::single(self, proto).map(|v| (v.addr, v.port))
    }
    #[inline(always)]
    fn sole(&self, addr: u32, port: u16, proto: u8) -> bool {
        BackendVips::sole(
            self,
            &VipKey {
                addr,
                port,
                proto,
                _pad: 0,
            },
        )
    }
}

impl VipList<[u32; 4]> for BackendVips6 {
    #[inline(always)]
    fn id(&self) -> u32 {
        self.id
    }
    #[inline(always)]
    fn no_lean(&self) -> bool {
        BackendVips6::no_lean(self)
    }
    #[inline(always)]
    fn vip(&self, i: usize) -> Option<([u32; 4], u16, u8)> {
        let v = self.vips.get(i)?;
        ((i as u32) < self.served()).then_some((v.addr, v.port, v.proto))
    }
    #[inline(always)]
    fn single(&self, proto: u8) -> Option<([u32; 4], u16)> {
        BackendVips6::single(self, proto).map(|v| (v.addr, v.port))
    }
    #[inline(always)]
    fn sole(&self, addr: [u32; 4], port: u16, proto: u8) -> bool {
        BackendVips6::sole(
            self,
            &VipKey6 {
                addr,
                port,
                proto,
                _pad: 0,
            },
        )
    }
}

/// A slot of `maps::NEAR_SINGLES` (`A`: an IPv4 address) or `NEAR_SINGLES6`: a copy of what a
/// backend's record (`lb_bevip_v1`) says a reply needs, keyed by the backend's address, port and
/// the reply's protocol: its one VIP of that protocol, or that it serves several. `P` makes it
/// 32 bytes (IPv4, nothing) or 64 (IPv6, two words), so that no slot crosses a cache line.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NearSingle<A, P> {
    addr: A,
    /// BE.
    port: u16,
    proto: u8,
    /// 1: the record named several VIPs of `proto` (`vip` and `vip_port` unused), else 0.
    several: u8,
    /// The backend's id.
    id: u32,
    /// The backend's one VIP of `proto`, address and port (BE).
    vip: A,
    vip_port: u16,
    _pad2: u16,
    /// The programs' clock (`clock::now_ns`) when the record was read.
    stamp: u64,
    _pad3: P,
}

const _: () = assert!(core::mem::size_of::<NearSingle<u32, [u32; 0]>>() == 32);
const _: () = assert!(core::mem::size_of::<NearSingle<[u32; 4], [u32; 2]>>() == 64);

impl<A: Copy, P: Default> NearSingle<A, P> {
    #[inline(always)]
    fn new(
        (addr, port, proto): (A, u16, u8),
        (vip, vip_port, id): (A, u16, u32),
        several: bool,
        now: u64,
    ) -> Self {
        NearSingle {
            addr,
            port,
            proto,
            several: several as u8,
            id,
            vip,
            vip_port,
            _pad2: 0,
            stamp: now,
            _pad3: P::default(),
        }
    }
}

/// The slot of a backend (its address folded to a word, its port) and a protocol in this CPU's
/// slots of `NEAR_SINGLES`: a multiplicative hash. The CPU cannot change while a program runs.
#[inline(always)]
fn near_single_slot(addr: u32, port: u16, proto: u8) -> u32 {
    let h = (addr ^ (port as u32).rotate_left(16) ^ (proto as u32).rotate_left(8))
        .wrapping_mul(0x9e37_79b1);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    (cpu << NEAR_SINGLE_BITS) | (h >> (32 - NEAR_SINGLE_BITS))
}

/// The id a `Family::near_single` answer has when this CPU holds no usable copy (no backend
/// slot has it).
pub const NO_COPY: u32 = u32::MAX;

/// The id a `Family::near_single` answer has when the copy says the backend serves several VIPs
/// of the protocol (its address and port are then not a VIP's; no backend slot has this id).
pub const SEVERAL: u32 = u32::MAX - 1;

/// The copy in `slot` when it is of this backend and protocol, younger than
/// `RECORD_COPY_MAX_AGE_NS`, and its id still a live backend (`live`) of that address and port
/// (`SEVERAL` in place of the id for a backend of several VIPs); else its id is `NO_COPY`. Every
/// value is defined either way: where an `Option`'s payload was left undefined, LLVM spilled that
/// undefined register, which the verifier refuses.
#[inline(always)]
fn copied_single<A: Copy + PartialEq, P>(
    map: &Array<NearSingle<A, P>>,
    slot: u32,
    (addr, port, proto): (A, u16, u8),
    now: u64,
    live: impl Fn(u32) -> Option<(A, u16)>,
) -> (A, u16, u32) {
    let Some(n) = map.get(slot) else {
        return (addr, port, NO_COPY);
    };
    let usable = n.addr == addr
        && n.port == port
        && n.proto == proto
        && now.wrapping_sub(n.stamp) < RECORD_COPY_MAX_AGE_NS
        && live(n.id) == Some((addr, port));
    let id = match (usable, n.several) {
        (false, _) => NO_COPY,
        (true, 0) => n.id,
        (true, _) => SEVERAL,
    };
    (n.vip, n.vip_port, id)
}

/// Writes `copy` into this CPU's `slot` (one of its own), replacing whatever it held.
#[inline(always)]
fn copy_single<A: Copy, P>(map: &Array<NearSingle<A, P>>, slot: u32, copy: NearSingle<A, P>) {
    if let Some(n) = map.get_ptr_mut(slot) {
        // SAFETY: a slot only this CPU uses; XDP and TC programs do not preempt each other on
        // one CPU, so no reader sees it half written.
        unsafe { *n = copy }
    }
}

/// Copies what the record of the backend in `entry` says into this CPU's slot of `map`, as a
/// reply's `Family::keep_single` does, for the next checks of its flows (`nat::lean_now`). This
/// runs in the globals `lb_copy*`, whose stack adds to that of the programs calling them, near
/// the kernel's bound: the backend's address is read again from its entry (`at`) after the
/// lookups rather than held across them (its fold and port are), so that little is spilled.
#[inline(always)]
fn copy_recorded<A: Copy, P, B, V: VipList<A> + 'static>(
    entry: Option<*const B>,
    at: impl Fn(*const B) -> Option<(A, u16)>,
    record: impl Fn(A, u16) -> Option<&'static V>,
    (map, fold): (&Array<NearSingle<A, P>>, impl Fn(A) -> u32),
    proto: u8,
) {
    let Some(be) = entry else {
        return;
    };
    let Some((addr, port)) = at(be) else {
        return;
    };
    let seen = (fold(addr), port);
    let Some(v) = record(addr, port) else {
        return;
    };
    let slot = near_single_slot(seen.0, seen.1, proto);
    let (Some(n), Some((addr, port))) = (map.get_ptr_mut(slot), at(be)) else {
        return;
    };
    // The entry read again is still the backend whose record was read: a slot the writer gave to
    // another backend meanwhile must not get the first one's VIP (the copy's check of its id
    // would find the slot live with the address the copy names).
    if (fold(addr), port) != seen {
        return;
    }
    // SAFETY: as in `copy_single`. Written field by field, not built on the stack first, and
    // the backend's own fields before the VIPs' loop: held across it, they were spilled.
    unsafe {
        (*n).addr = addr;
        (*n).port = port;
        (*n).proto = proto;
        (*n).id = v.id();
        (*n).stamp = crate::clock::now_ns();
        match v.single(proto) {
            Some((vip, vip_port)) => {
                (*n).several = 0;
                (*n).vip = vip;
                (*n).vip_port = vip_port;
            }
            // What a copy of several VIPs names is not read.
            None => (*n).several = 1,
        }
    }
}

pub trait Family {
    type Addr: Copy + PartialEq;
    type Flow: Copy;
    type Vips: VipList<Self::Addr> + 'static;

    /// Remembers, for a first fragment (IPv4 only: IPv6 fragments never get here), the address
    /// its later fragments must get as destination (`dst`) or source. Err when the table is full.
    fn remember_fragment(&self, addr: Self::Addr, dst: bool) -> Result<(), i32>;
    fn consistent(&self) -> bool;
    /// The TCP or UDP header as parse found it.
    fn l4(&self) -> &L4;
    /// A TCP segment of an established flow (no SYN).
    #[inline(always)]
    fn established(&self) -> bool {
        self.l4().established
    }
    /// A TCP segment's FIN and RST bits, as the client's (`END_CLIENT_FIN`, `END_RESET`).
    #[inline(always)]
    fn end(&self) -> u16 {
        self.l4().end
    }
    /// A UDP datagram.
    #[inline(always)]
    fn udp(&self) -> bool {
        self.l4().proto == lb_common::PROTO_UDP
    }
    /// A TCP segment with SYN (a whole header).
    #[inline(always)]
    fn syn(&self) -> bool {
        self.l4().syn
    }
    /// IP bytes, for the traffic counters.
    fn ip_len(&self) -> u64;
    fn flow(&self) -> Self::Flow;
    /// Whether the flow's destination may be a VIP (`lb_vipf_v1`); false: it is not.
    fn maybe_vip(flow: &Self::Flow) -> bool;
    /// The service of the flow's destination, from the hash map (after `maybe_vip`).
    fn service(flow: &Self::Flow) -> Option<&'static Service>;
    fn tracked(flow: &Self::Flow) -> Option<FlowEntry>;
    /// The flow's entry in place, to note its checks in it.
    fn tracked_mut(flow: &Self::Flow) -> Option<*mut FlowEntry>;
    /// `tracked_mut` through a call (`flows::find_cold`): off the hot paths.
    fn tracked_cold(flow: &Self::Flow) -> Option<*mut FlowEntry>;
    /// The VIP a reply with key `flow` comes from (`nat::from_backend`); None: not a reply.
    /// IPv4: the usual reply decided in line (`nat::lean_reply`), any other through
    /// `nat::lb_reply4`. IPv6: in line; the IPv6 programs' frame is too large for a call to
    /// one more global function under the kernel's 512-byte bound on a call chain's stack.
    fn reply_call(flow: &Self::Flow, syn: bool, end: u16) -> Option<(Self::Addr, u16)>;
    fn hash(flow: &Self::Flow) -> u32;
    /// A live backend slot's address and port (BE).
    fn backend(id: u32) -> Option<(Self::Addr, u16)>;
    /// The key the backend's replies to this flow carry.
    fn reply_key(flow: &Self::Flow, addr: Self::Addr, port: u16) -> Self::Flow;
    /// The client's flow to the VIP `addr`:`port` whose replies carry the key `reply`.
    fn client_flow(reply: &Self::Flow, addr: Self::Addr, port: u16) -> Self::Flow;
    /// The VIP address and port a flow to a VIP is for.
    fn vip(flow: &Self::Flow) -> (Self::Addr, u16);
    /// The source port (BE).
    fn source_port(flow: &Self::Flow) -> u16;
    /// Records the flow's backend.
    fn track(flow: &Self::Flow, entry: &FlowEntry) -> Result<(), i32>;
    /// Removes the flow's entry.
    fn untrack(flow: &Self::Flow);
    /// The entry of `lb_bevip_v1` of the backend `addr`:`port`.
    fn record(addr: Self::Addr, port: u16) -> Option<&'static Self::Vips>;
    /// The entry of `lb_bevip_v1` of the backend a reply key comes from.
    fn backend_vips(reply: &Self::Flow) -> Option<&'static Self::Vips>;
    /// This CPU's copy (`maps::NEAR_SINGLES`) of what the record of the backend a reply key comes
    /// from said: its one VIP of the reply's protocol, address and port, and its id (`SEVERAL`
    /// when it serves several VIPs of the protocol). Only a copy taken less than
    /// `RECORD_COPY_MAX_AGE_NS` before `now` whose id is still live with the backend's address
    /// and port.
    fn near_single(reply: &Self::Flow, now: u64) -> (Self::Addr, u16, u32);
    /// Keeps this CPU's copy of the record's answer for the backend a reply key comes from: its
    /// one VIP `vip`:`port` of the reply's protocol, or that it serves `several` (then `vip` and
    /// `port` are any), and its id.
    fn keep_single(reply: &Self::Flow, vip: (Self::Addr, u16), id: u32, several: bool, now: u64);
    /// Copies what the record of backend `id` says for flows of `flow`'s protocol into this
    /// CPU's slot for it (`copy_recorded`), through the global `lb_copy*`.
    fn copy_call(flow: &Self::Flow, id: u32);
    /// `copy_call`'s body.
    fn copy_recorded(flow: &Self::Flow, id: u32);
    /// The protocol of a flow.
    fn proto(flow: &Self::Flow) -> u8;
    /// The reverse entry of a reply key: the VIP address and port the reply must come from, and
    /// how far its TCP connection has ended (`END_*` bits).
    fn reply_entry(reply: &Self::Flow) -> Option<(Self::Addr, u16, u16)>;
    /// Removes a reverse entry.
    fn forget_reply(reply: &Self::Flow);
    /// Writes a reverse entry, with the map update `flags` (`BPF_NOEXIST` or 0).
    fn set_reply(
        reply: &Self::Flow,
        vip: Self::Addr,
        port: u16,
        ends: u16,
        flags: u64,
    ) -> Result<(), i32>;
    /// Rewrites the destination and fixes the checksums (last: in TC the checksum helpers move
    /// the packet, so nothing may read the headers through `self` afterwards).
    fn set_dst<C: Hook>(&self, ctx: &C, addr: Self::Addr, port: u16);
    /// Rewrites the source, as `set_dst`.
    fn set_src<C: Hook>(&self, ctx: &C, addr: Self::Addr, port: u16);
}

/// The L4 checksum covers the addresses (pseudo-header) and the ports.
#[inline(always)]
fn fix_l4<C: Hook>(ctx: &C, l4: &L4, addrs: u32, old_port: u16, port: u16) {
    if l4.csum.is_null() {
        return;
    }
    let udp = l4.proto == lb_common::PROTO_UDP;
    ctx.csum_l4(
        l4.csum,
        l4.csum_off,
        udp,
        addrs,
        csum::diff2(old_port, port),
    );
}

// SAFETY (for every dereference below): the headers and the L4 pointers were bounds checked by
// parse(); hash map values are replaced whole (RCU) by the agent, never written in place.

impl Family for Packet {
    type Addr = u32;
    type Flow = Flow;
    type Vips = BackendVips;

    #[inline(always)]
    fn l4(&self) -> &L4 {
        &self.l4
    }
    #[inline(always)]
    fn remember_fragment(&self, addr: u32, dst: bool) -> Result<(), i32> {
        if !self.fragment {
            return Ok(());
        }
        // The later fragments carry the addresses as they arrive, before any rewrite.
        let key = unsafe {
            FragKey {
                src: (*self.ip).saddr,
                dst: (*self.ip).daddr,
                id: (*self.ip).id,
                proto: self.l4.proto,
                _pad: 0,
            }
        };
        let entry = FragEntry {
            addr,
            dst: dst as u8,
            _pad: [0; 3],
        };
        FRAGMENTS.insert(&key, &entry, 0)
    }
    #[inline(always)]
    fn consistent(&self) -> bool {
        self.consistent
    }
    #[inline(always)]
    fn ip_len(&self) -> u64 {
        u16::from_be(unsafe { (*self.ip).tot_len }) as u64
    }
    #[inline(always)]
    fn flow(&self) -> Flow {
        unsafe {
            Flow {
                src: (*self.ip).saddr,
                dst: (*self.ip).daddr,
                sport: (*self.l4.ports).sport,
                dport: (*self.l4.ports).dport,
                proto: self.l4.proto,
                _pad: [0; 3],
            }
        }
    }
    #[inline(always)]
    fn maybe_vip(f: &Flow) -> bool {
        maps::maybe_vip(f.dst, f.dport)
    }
    #[inline(always)]
    fn service(f: &Flow) -> Option<&'static Service> {
        maps::lookup_service4(f.dst, f.dport, f.proto)
    }
    #[inline(always)]
    fn tracked(f: &Flow) -> Option<FlowEntry> {
        crate::flows::find_cold(f).map(|e| unsafe { *e })
    }
    #[inline(always)]
    fn tracked_cold(f: &Flow) -> Option<*mut FlowEntry> {
        crate::flows::find_cold(f)
    }
    #[inline(always)]
    fn reply_call(f: &Flow, syn: bool, end: u16) -> Option<(u32, u16)> {
        if let Some(found) = crate::nat::lean_reply::<Packet>(f, syn, end) {
            return Some(found);
        }
        let r = crate::nat::lb_reply4(f, crate::nat::segment_bits(syn, end));
        (r >> 48 != 0).then_some((r as u32, (r >> 32) as u16))
    }
    #[inline(always)]
    fn tracked_mut(f: &Flow) -> Option<*mut FlowEntry> {
        crate::flows::find(&FLOWS, f)
    }
    #[inline(always)]
    fn hash(f: &Flow) -> u32 {
        flow_hash(f.src, f.dst, f.sport, f.dport, f.proto)
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<(u32, u16)> {
        match BACKENDS.get(id) {
            Some(be) if be.flags & BACKEND_LIVE != 0 => Some((be.addr, be.port)),
            _ => None,
        }
    }
    #[inline(always)]
    fn reply_key(f: &Flow, addr: u32, port: u16) -> Flow {
        Flow {
            src: addr,
            dst: f.src,
            sport: port,
            dport: f.sport,
            proto: f.proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn client_flow(reply: &Flow, addr: u32, port: u16) -> Flow {
        Flow {
            src: reply.dst,
            dst: addr,
            sport: reply.dport,
            dport: port,
            proto: reply.proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn vip(f: &Flow) -> (u32, u16) {
        (f.dst, f.dport)
    }
    #[inline(always)]
    fn source_port(f: &Flow) -> u16 {
        f.sport
    }
    #[inline(always)]
    fn track(f: &Flow, entry: &FlowEntry) -> Result<(), i32> {
        crate::flows::insert_cold(f, entry)
    }
    #[inline(always)]
    fn untrack(f: &Flow) {
        crate::flows::remove_cold(f);
    }
    #[inline(always)]
    fn record(addr: u32, port: u16) -> Option<&'static BackendVips> {
        let key = BackendKey {
            addr,
            port,
            _pad: 0,
        };
        unsafe { BACKEND_VIPS.get(&key) }
    }
    #[inline(always)]
    fn backend_vips(r: &Flow) -> Option<&'static BackendVips> {
        Self::record(r.src, r.sport)
    }
    #[inline(always)]
    fn near_single(r: &Flow, now: u64) -> (u32, u16, u32) {
        let slot = near_single_slot(r.src, r.sport, r.proto);
        copied_single(
            &NEAR_SINGLES,
            slot,
            (r.src, r.sport, r.proto),
            now,
            Self::backend,
        )
    }
    #[inline(always)]
    fn keep_single(r: &Flow, (vip, port): (u32, u16), id: u32, several: bool, now: u64) {
        let slot = near_single_slot(r.src, r.sport, r.proto);
        copy_single(
            &NEAR_SINGLES,
            slot,
            NearSingle::new((r.src, r.sport, r.proto), (vip, port, id), several, now),
        );
    }
    #[inline(always)]
    fn copy_call(f: &Flow, id: u32) {
        let _ = crate::nat::lb_copy4(f, id);
    }
    #[inline(always)]
    fn copy_recorded(f: &Flow, id: u32) {
        copy_recorded(
            BACKENDS.get_ptr(id),
            // SAFETY: a pointer from a successful lookup in an array that lives as long as the
            // program.
            |be| match unsafe { &*be } {
                be if be.flags & BACKEND_LIVE != 0 => Some((be.addr, be.port)),
                _ => None,
            },
            Self::record,
            (&NEAR_SINGLES, |a| a),
            f.proto,
        )
    }
    #[inline(always)]
    fn proto(f: &Flow) -> u8 {
        f.proto
    }
    #[inline(always)]
    fn reply_entry(r: &Flow) -> Option<(u32, u16, u16)> {
        unsafe { REPLIES.get(r) }.map(|e| (e.vip_addr, e.vip_port, e.ends))
    }
    #[inline(always)]
    fn forget_reply(r: &Flow) {
        let _ = REPLIES.remove(r);
    }
    #[inline(always)]
    fn set_reply(r: &Flow, vip: u32, port: u16, ends: u16, flags: u64) -> Result<(), i32> {
        let back = ReplyEntry {
            vip_addr: vip,
            vip_port: port,
            ends,
        };
        REPLIES.insert(r, &back, flags)
    }
    #[inline(always)]
    fn set_dst<C: Hook>(&self, ctx: &C, addr: u32, port: u16) {
        let (old, old_port) = unsafe {
            let old = ((*self.ip).daddr, (*self.l4.ports).dport);
            (*self.ip).daddr = addr;
            (*self.l4.ports).dport = port;
            old
        };
        let d = csum::diff4(old, addr);
        ctx.csum_l3(unsafe { &raw mut (*self.ip).check }, IP_CHECK_OFF, d);
        fix_l4(ctx, &self.l4, d, old_port, port);
    }
    #[inline(always)]
    fn set_src<C: Hook>(&self, ctx: &C, addr: u32, port: u16) {
        let (old, old_port) = unsafe {
            let old = ((*self.ip).saddr, (*self.l4.ports).sport);
            (*self.ip).saddr = addr;
            (*self.l4.ports).sport = port;
            old
        };
        let d = csum::diff4(old, addr);
        ctx.csum_l3(unsafe { &raw mut (*self.ip).check }, IP_CHECK_OFF, d);
        fix_l4(ctx, &self.l4, d, old_port, port);
    }
}

impl Route for Ip4 {
    #[inline(always)]
    fn hop_limit(&self) -> u8 {
        unsafe { (*self.0).ttl }
    }
    #[inline(always)]
    fn decrement_hop_limit(&self) {
        // As a router does, with the checksum fixed the kernel's way.
        unsafe {
            let check = (*self.0).check as u32 + (0x0100u16).to_be() as u32;
            (*self.0).check = (check + (check >= 0xffff) as u32) as u16;
            (*self.0).ttl -= 1;
        }
    }
    #[inline(always)]
    fn destination(&self) -> ([u32; 4], u8) {
        ([unsafe { (*self.0).daddr }, 0, 0, 0], AF_INET)
    }
    #[inline(always)]
    fn cacheable(&self) -> bool {
        true
    }
    #[inline(always)]
    fn fib_len<C: Hook>(&self) -> u16 {
        C::fib_len(u16::from_be(unsafe { (*self.0).tot_len }))
    }
    #[inline(always)]
    fn fib_params<C: Hook>(&self, fib: &mut bpf_fib_lookup) {
        unsafe {
            fib.family = AF_INET;
            fib.l4_protocol = (*self.0).proto;
            fib.__bindgen_anon_1.tot_len = self.fib_len::<C>();
            fib.__bindgen_anon_3.ipv4_src = (*self.0).saddr;
            fib.__bindgen_anon_4.ipv4_dst = (*self.0).daddr;
        }
    }
}

impl Family for Packet6 {
    type Addr = [u32; 4];
    type Flow = Flow6;
    type Vips = BackendVips6;

    #[inline(always)]
    fn l4(&self) -> &L4 {
        &self.l4
    }
    #[inline(always)]
    fn remember_fragment(&self, _addr: [u32; 4], _dst: bool) -> Result<(), i32> {
        Ok(())
    }
    #[inline(always)]
    fn consistent(&self) -> bool {
        self.consistent
    }
    #[inline(always)]
    fn ip_len(&self) -> u64 {
        u16::from_be(unsafe { (*self.ip).payload_len }) as u64 + 40
    }
    #[inline(always)]
    fn flow(&self) -> Flow6 {
        unsafe {
            Flow6 {
                src: (*self.ip).saddr,
                dst: (*self.ip).daddr,
                sport: (*self.l4.ports).sport,
                dport: (*self.l4.ports).dport,
                proto: self.l4.proto,
                _pad: [0; 3],
            }
        }
    }
    #[inline(always)]
    fn maybe_vip(f: &Flow6) -> bool {
        maps::maybe_vip(lb_common::fold6(f.dst), f.dport)
    }
    #[inline(always)]
    fn service(f: &Flow6) -> Option<&'static Service> {
        maps::lookup_service6(f.dst, f.dport, f.proto)
    }
    #[inline(always)]
    fn tracked(f: &Flow6) -> Option<FlowEntry> {
        crate::flows::find_cold(f).map(|e| unsafe { *e })
    }
    #[inline(always)]
    fn tracked_cold(f: &Flow6) -> Option<*mut FlowEntry> {
        crate::flows::find_cold(f)
    }
    #[inline(always)]
    fn reply_call(f: &Flow6, syn: bool, end: u16) -> Option<([u32; 4], u16)> {
        crate::nat::from_backend::<Packet6>(f, syn, end)
    }
    #[inline(always)]
    fn tracked_mut(f: &Flow6) -> Option<*mut FlowEntry> {
        crate::flows::find(&FLOWS6, f)
    }
    #[inline(always)]
    fn hash(f: &Flow6) -> u32 {
        flow_hash6(&f.src, &f.dst, f.sport, f.dport, f.proto)
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<([u32; 4], u16)> {
        match BACKENDS6.get(id) {
            Some(be) if be.flags & BACKEND_LIVE != 0 => Some((be.addr, be.port)),
            _ => None,
        }
    }
    #[inline(always)]
    fn reply_key(f: &Flow6, addr: [u32; 4], port: u16) -> Flow6 {
        Flow6 {
            src: addr,
            dst: f.src,
            sport: port,
            dport: f.sport,
            proto: f.proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn client_flow(reply: &Flow6, addr: [u32; 4], port: u16) -> Flow6 {
        Flow6 {
            src: reply.dst,
            dst: addr,
            sport: reply.dport,
            dport: port,
            proto: reply.proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn vip(f: &Flow6) -> ([u32; 4], u16) {
        (f.dst, f.dport)
    }
    #[inline(always)]
    fn source_port(f: &Flow6) -> u16 {
        f.sport
    }
    #[inline(always)]
    fn track(f: &Flow6, entry: &FlowEntry) -> Result<(), i32> {
        crate::flows::insert_cold(f, entry)
    }
    #[inline(always)]
    fn untrack(f: &Flow6) {
        crate::flows::remove_cold(f);
    }
    #[inline(always)]
    fn record(addr: [u32; 4], port: u16) -> Option<&'static BackendVips6> {
        let key = BackendKey6 {
            addr,
            port,
            _pad: 0,
        };
        unsafe { BACKEND_VIPS6.get(&key) }
    }
    #[inline(always)]
    fn backend_vips(r: &Flow6) -> Option<&'static BackendVips6> {
        Self::record(r.src, r.sport)
    }
    #[inline(always)]
    fn near_single(r: &Flow6, now: u64) -> ([u32; 4], u16, u32) {
        let slot = near_single_slot(fold6(r.src), r.sport, r.proto);
        copied_single(
            &NEAR_SINGLES6,
            slot,
            (r.src, r.sport, r.proto),
            now,
            Self::backend,
        )
    }
    #[inline(always)]
    fn keep_single(r: &Flow6, (vip, port): ([u32; 4], u16), id: u32, several: bool, now: u64) {
        let slot = near_single_slot(fold6(r.src), r.sport, r.proto);
        copy_single(
            &NEAR_SINGLES6,
            slot,
            NearSingle::new((r.src, r.sport, r.proto), (vip, port, id), several, now),
        );
    }
    #[inline(always)]
    fn copy_call(f: &Flow6, id: u32) {
        let _ = crate::nat::lb_copy6(f, id);
    }
    #[inline(always)]
    fn copy_recorded(f: &Flow6, id: u32) {
        copy_recorded(
            BACKENDS6.get_ptr(id),
            // SAFETY: a pointer from a successful lookup in an array that lives as long as the
            // program.
            |be| match unsafe { &*be } {
                be if be.flags & BACKEND_LIVE != 0 => Some((be.addr, be.port)),
                _ => None,
            },
            Self::record,
            (&NEAR_SINGLES6, fold6),
            f.proto,
        )
    }
    #[inline(always)]
    fn proto(f: &Flow6) -> u8 {
        f.proto
    }
    #[inline(always)]
    fn reply_entry(r: &Flow6) -> Option<([u32; 4], u16, u16)> {
        unsafe { REPLIES6.get(r) }.map(|e| (e.vip_addr, e.vip_port, e.ends))
    }
    #[inline(always)]
    fn forget_reply(r: &Flow6) {
        let _ = REPLIES6.remove(r);
    }
    #[inline(always)]
    fn set_reply(r: &Flow6, vip: [u32; 4], port: u16, ends: u16, flags: u64) -> Result<(), i32> {
        let back = ReplyEntry6 {
            vip_addr: vip,
            vip_port: port,
            ends,
        };
        REPLIES6.insert(r, &back, flags)
    }
    #[inline(always)]
    fn set_dst<C: Hook>(&self, ctx: &C, addr: [u32; 4], port: u16) {
        let (old, old_port) = unsafe {
            let old = ((*self.ip).daddr, (*self.l4.ports).dport);
            (*self.ip).daddr = addr;
            (*self.l4.ports).dport = port;
            old
        };
        fix_l4(ctx, &self.l4, csum::diff_words(&old, &addr), old_port, port);
    }
    #[inline(always)]
    fn set_src<C: Hook>(&self, ctx: &C, addr: [u32; 4], port: u16) {
        let (old, old_port) = unsafe {
            let old = ((*self.ip).saddr, (*self.l4.ports).sport);
            (*self.ip).saddr = addr;
            (*self.l4.ports).sport = port;
            old
        };
        fix_l4(ctx, &self.l4, csum::diff_words(&old, &addr), old_port, port);
    }
}

impl Route for Ip6 {
    #[inline(always)]
    fn hop_limit(&self) -> u8 {
        unsafe { (*self.0).hop_limit }
    }
    #[inline(always)]
    fn decrement_hop_limit(&self) {
        // IPv6 has no header checksum.
        unsafe { (*self.0).hop_limit -= 1 };
    }
    #[inline(always)]
    fn destination(&self) -> ([u32; 4], u8) {
        (unsafe { (*self.0).daddr }, AF_INET6)
    }
    #[inline(always)]
    fn cacheable(&self) -> bool {
        !strict_source6(unsafe { &(*self.0).saddr })
    }
    #[inline(always)]
    fn fib_len<C: Hook>(&self) -> u16 {
        // Saturating: a payload length near 64 KiB must not wrap to a small datagram.
        C::fib_len(u16::from_be(unsafe { (*self.0).payload_len }).saturating_add(40))
    }
    #[inline(always)]
    fn fib_params<C: Hook>(&self, fib: &mut bpf_fib_lookup) {
        unsafe {
            fib.family = AF_INET6;
            fib.l4_protocol = (*self.0).next_header;
            fib.__bindgen_anon_1.tot_len = self.fib_len::<C>();
            fib.__bindgen_anon_3.ipv6_src = (*self.0).saddr;
            fib.__bindgen_anon_4.ipv6_dst = (*self.0).daddr;
        }
    }
}

/// An IPv6 source the FIB helper refuses to forward from whatever the destination (multicast,
/// link-local, loopback: `rt6_need_strict`): such a packet never uses or fills the next-hop
/// cache, so it keeps the FIB's answer.
#[inline(always)]
fn strict_source6(src: &[u32; 4]) -> bool {
    let first = u32::from_be(src[0]);
    first >> 24 == 0xff
        || first >> 22 == 0x3fa
        || (src[0] == 0 && src[1] == 0 && src[2] == 0 && u32::from_be(src[3]) == 1)
}
