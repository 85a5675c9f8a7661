//! Service lookup, backend selection with flow tracking, and the address rewrites.
use crate::{
    csum,
    maps::{BACKENDS, FLOWS, MEMBERS, REPLIES, RING, SERVICES, account},
    parse::Packet,
};
use lb_common::{
    BACKEND_LIVE, Flow, FlowEntry, MemberKey, RING_SIZE, ReplyEntry, Service, Stat, VipKey,
    flow_hash, ring_index,
};

/// What the translation stage did, or why it stopped.
pub enum Translated {
    /// Rewritten; the stat says how (new flow, tracked flow, reply).
    Rewritten(Stat),
    /// Not for a VIP and not a reply: leave it alone.
    NotOurs,
    /// For a VIP, but it cannot be served.
    Drop(Stat),
}

#[inline(always)]
fn flow_of(p: &Packet) -> Flow {
    // SAFETY: both headers were bounds checked by parse().
    unsafe {
        Flow {
            src: (*p.ip).saddr,
            dst: (*p.ip).daddr,
            sport: (*p.ports).sport,
            dport: (*p.ports).dport,
            proto: p.proto,
            _pad: [0; 3],
        }
    }
}

#[inline(always)]
pub fn translate(p: &Packet) -> Translated {
    let flow = flow_of(p);
    let vip = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: hash map values are replaced whole (RCU), never written in place by the agent.
    match unsafe { SERVICES.get(&vip) } {
        Some(svc) => to_backend(p, &flow, svc),
        None => from_backend(p, &flow),
    }
}

/// The backend for a packet to a VIP: the tracked one while it still serves the service, else a
/// fresh pick from the service's live table.
#[inline(always)]
fn to_backend(p: &Packet, flow: &Flow, svc: &Service) -> Translated {
    if p.fragment {
        return Translated::Drop(Stat::DropFragment);
    }
    if !p.consistent {
        return Translated::Drop(Stat::DropMalformed);
    }
    let tracked = match unsafe { FLOWS.get(flow) } {
        Some(e) if e.service == svc.id && still_member(svc.id, e.backend) => Some(e.backend),
        _ => None,
    };
    let (backend_id, stat) = match tracked {
        Some(b) => (b, Stat::Forwarded),
        None => {
            if svc.active == 0 {
                return Translated::Drop(Stat::DropNoBackend);
            }
            let slot =
                flow_hash(flow.src, flow.dst, flow.sport, flow.dport, flow.proto) % RING_SIZE;
            match RING.get(ring_index(svc.id, svc.ring_half, slot)) {
                Some(b) => (*b, Stat::NewFlow),
                None => return Translated::Drop(Stat::DropBadBackend),
            }
        }
    };
    let be = match BACKENDS.get(backend_id) {
        Some(be) if be.flags & BACKEND_LIVE != 0 => *be,
        _ => return Translated::Drop(Stat::DropBadBackend),
    };
    let reply = Flow {
        src: be.addr,
        dst: flow.src,
        sport: be.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // A new flow records both directions; a tracked one makes sure its reply entry was not
    // evicted, so replies of a long-silent backend still come from the VIP.
    if stat == Stat::NewFlow || unsafe { REPLIES.get(&reply) }.is_none() {
        let entry = FlowEntry {
            service: svc.id,
            backend: backend_id,
        };
        let back = ReplyEntry {
            vip_addr: flow.dst,
            vip_port: flow.dport,
            _pad: 0,
        };
        if FLOWS.insert(flow, &entry, 0).is_err() || REPLIES.insert(&reply, &back, 0).is_err() {
            return Translated::Drop(Stat::DropFlowTable);
        }
    }
    // SAFETY: the IP header was bounds checked by parse().
    let ip_len = u16::from_be(unsafe { (*p.ip).tot_len }) as u64;
    account(svc.id, backend_id, ip_len, stat == Stat::NewFlow);
    rewrite_dst(p, be.addr, be.port);
    Translated::Rewritten(stat)
}

#[inline(always)]
fn still_member(service: u32, backend: u32) -> bool {
    unsafe { MEMBERS.get(&MemberKey { service, backend }) }.is_some()
}

/// A reply of a translated flow gets the VIP as its source.
#[inline(always)]
fn from_backend(p: &Packet, flow: &Flow) -> Translated {
    match unsafe { REPLIES.get(flow) } {
        Some(r) => {
            let (addr, port) = (r.vip_addr, r.vip_port);
            rewrite_src(p, addr, port);
            Translated::Rewritten(Stat::Reply)
        }
        None => Translated::NotOurs,
    }
}

#[inline(always)]
fn rewrite_dst(p: &Packet, addr: u32, port: u16) {
    // SAFETY: every pointer in Packet was bounds checked by parse().
    unsafe {
        let old_addr = (*p.ip).daddr;
        let old_port = (*p.ports).dport;
        (*p.ip).daddr = addr;
        (*p.ip).check = csum::replace4((*p.ip).check, old_addr, addr);
        (*p.ports).dport = port;
        fix_l4(p, old_addr, addr, old_port, port);
    }
}

#[inline(always)]
fn rewrite_src(p: &Packet, addr: u32, port: u16) {
    // SAFETY: as in rewrite_dst.
    unsafe {
        let old_addr = (*p.ip).saddr;
        let old_port = (*p.ports).sport;
        (*p.ip).saddr = addr;
        (*p.ip).check = csum::replace4((*p.ip).check, old_addr, addr);
        (*p.ports).sport = port;
        fix_l4(p, old_addr, addr, old_port, port);
    }
}

/// The L4 checksum covers the addresses (pseudo-header) and the ports.
#[inline(always)]
unsafe fn fix_l4(p: &Packet, old_addr: u32, addr: u32, old_port: u16, port: u16) {
    if p.l4_csum.is_null() {
        return;
    }
    unsafe {
        let mut c = csum::replace4(*p.l4_csum, old_addr, addr);
        c = csum::replace2(c, old_port, port);
        if c == 0 && p.proto == lb_common::PROTO_UDP {
            // 0 means "no checksum" in UDP; the same sum is written as all ones.
            c = 0xffff;
        }
        *p.l4_csum = c;
    }
}
