//! Service lookup, backend selection with flow tracking, and the address rewrites, for either
//! address family (`af::Family`).
use crate::{
    af::Family,
    hook::Hook,
    maps::{MEMBERS, RING, account, flow_lost, ring_size},
};
use lb_common::{FlowEntry, MemberKey, Service, Stat, ring_index};

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
pub fn translate<C: Hook, P: Family>(ctx: &C, p: &P) -> Translated {
    let flow = p.flow();
    match P::service(&flow) {
        Some(svc) => to_backend(ctx, p, &flow, svc),
        None => from_backend(ctx, p, &flow),
    }
}

/// The backend for a packet to a VIP: the tracked one while it still serves the service, else a
/// fresh pick from the service's live table.
#[inline(always)]
fn to_backend<C: Hook, P: Family>(ctx: &C, p: &P, flow: &P::Flow, svc: &Service) -> Translated {
    if !p.consistent() {
        return Translated::Drop(Stat::DropMalformed);
    }
    let tracked = match P::tracked(flow) {
        Some(e) if e.service == svc.id && still_member(svc.id, e.backend) => Some(e.backend),
        Some(_) => None,
        None => {
            if p.established() {
                flow_lost();
            }
            None
        }
    };
    let (backend_id, stat) = match tracked {
        Some(b) => (b, Stat::Forwarded),
        None => {
            if svc.active == 0 {
                return Translated::Drop(Stat::DropNoBackend);
            }
            let size = ring_size();
            if size == 0 {
                return Translated::Drop(Stat::DropBadBackend);
            }
            let (element, lane) = ring_index(svc.id, svc.ring_half, P::hash(flow) % size, size);
            match RING.get(element) {
                Some(chunk) => match chunk.get(lane as usize) {
                    Some(b) => (*b, Stat::NewFlow),
                    None => return Translated::Drop(Stat::DropBadBackend),
                },
                None => return Translated::Drop(Stat::DropBadBackend),
            }
        }
    };
    let Some((addr, port)) = P::backend(backend_id) else {
        return Translated::Drop(Stat::DropBadBackend);
    };
    let reply = P::reply_key(flow, addr, port);
    // A new flow records both directions; a tracked one makes sure its reply entry was not
    // evicted, so replies of a long-silent backend still come from the VIP.
    if stat == Stat::NewFlow || !P::has_reply(&reply) {
        let entry = FlowEntry {
            service: svc.id,
            backend: backend_id,
        };
        if P::record(flow, &entry, &reply).is_err() {
            return Translated::Drop(Stat::DropFlowTable);
        }
    }
    if p.remember_fragment(addr, true).is_err() {
        return Translated::Drop(Stat::DropFragment);
    }
    account(svc.id, backend_id, p.ip_len(), stat == Stat::NewFlow);
    p.set_dst(ctx, addr, port);
    Translated::Rewritten(stat)
}

#[inline(always)]
pub fn still_member(service: u32, backend: u32) -> bool {
    unsafe { MEMBERS.get(&MemberKey { service, backend }) }.is_some()
}

/// A reply of a translated flow gets the VIP as its source.
#[inline(always)]
fn from_backend<C: Hook, P: Family>(ctx: &C, p: &P, flow: &P::Flow) -> Translated {
    match P::reply_source(flow) {
        Some((addr, port)) => {
            // A reply's fragment that the table cannot take still goes: its later fragments
            // then pass as they are.
            let _ = p.remember_fragment(addr, false);
            p.set_src(ctx, addr, port);
            Translated::Rewritten(Stat::Reply)
        }
        None => Translated::NotOurs,
    }
}
